//! The ORM against raw tokio-postgres doing the same work, side by side in
//! one run on the same data. Prints one table: workload, ORM median, raw
//! median, and the ratio ORM/raw (below 1.00 means the ORM is faster).
//!
//! ```text
//! cargo bench --bench orm_vs_raw            # the full run
//! ORM_BENCH_SMOKE=1 cargo bench --bench orm_vs_raw   # tiny sizes, one sample: CI keeps it compiling and working
//! ORM_BENCH_ONLY=select,join cargo bench --bench orm_vs_raw   # some workloads only
//! ORM_BENCH_PIN=1 cargo bench --bench orm_vs_raw   # this process and its server backend on one CPU
//! ORM_BENCH_PIN=split cargo bench --bench orm_vs_raw   # ... on two CPUs, one each
//! ```
//!
//! The workloads' names for `ORM_BENCH_ONLY`: `stream`, `select`, `get`,
//! `join` (the three join workloads), `insert`, `insert_keyed`, `update`,
//! `delete`.
//!
//! The raw side uses statements prepared once, on the same pooled connection
//! the ORM's sessions use (a pool of one), so that both talk to the same
//! server backend; the ORM side goes through its engine, pool and sessions
//! as users would.
//! Both decode rows into the same struct. This is a benchmark, not a test:
//! nothing here asserts a duration.

use std::future::Future;
use std::pin::pin;
use std::time::{Duration, Instant};

use orm::dev::{DevServer, TestDatabase};
use orm::prelude::*;
use orm::tokio_postgres::binary_copy::BinaryCopyInWriter;
use orm::tokio_postgres::types::{BorrowToSql, ToSql, Type};
use orm::tokio_postgres::{Row, Statement};

orm::declarative_base!(BenchBase);

#[derive(Model, Debug, Clone)]
#[orm(table = "users", base = BenchBase)]
struct User {
    #[orm(primary_key, identity)]
    id: i64,
    name: String,
    email: String,
    age: i32,
}

#[derive(Model, Debug, Clone)]
#[orm(table = "posts", base = BenchBase)]
struct Post {
    #[orm(primary_key, identity)]
    id: i64,
    #[orm(foreign_key = User::id, index)]
    user_id: i64,
    title: String,
    score: i32,
}

/// The table inserts go to, emptied between samples.
#[derive(Model, Debug, Clone)]
#[orm(table = "new_users", base = BenchBase)]
struct NewUser {
    #[orm(primary_key, identity)]
    id: i64,
    name: String,
    email: String,
    age: i32,
}

/// Keys set by the application and no server defaults: large batches of
/// these go in by binary COPY.
#[derive(Model, Debug, Clone)]
#[orm(table = "keyed_users", base = BenchBase)]
struct KeyedUser {
    #[orm(primary_key)]
    id: i64,
    name: String,
    email: String,
    age: i32,
}

fn user_from_row(row: &Row) -> User {
    user_from_row_at(row, 0)
}

/// A user whose columns start at `offset` (after a post's, in a join).
fn user_from_row_at(row: &Row, offset: usize) -> User {
    User {
        id: row.get(offset),
        name: row.get(offset + 1),
        email: row.get(offset + 2),
        age: row.get(offset + 3),
    }
}

/// A post whose columns start at `offset` (after the user's, in a join).
fn post_from_row_at(row: &Row, offset: usize) -> Post {
    Post {
        id: row.get(offset),
        user_id: row.get(offset + 1),
        title: row.get(offset + 2),
        score: row.get(offset + 3),
    }
}

fn new_user(i: usize) -> NewUser {
    NewUser {
        id: 0,
        name: format!("user {i}"),
        email: format!("user{i}@example.com"),
        age: (i % 90) as i32,
    }
}

struct Config {
    smoke: bool,
    /// The workloads to run (`ORM_BENCH_ONLY`); all when empty.
    only: Vec<String>,
    /// Wall time to spend sampling each side of a workload.
    budget: Duration,
}

impl Config {
    fn wants(&self, workload: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|w| w == workload)
    }

    /// Samples each side takes at most. Enough that the short workloads
    /// spread over about a second, as the long ones do: 200 samples of a
    /// one-row select took 30 ms, one moment of the machine's, and its
    /// ratio moved from 1.02 to 1.06 between runs (1.03 to 1.04 with
    /// 5,000).
    fn samples_cap(&self) -> usize {
        if self.smoke {
            1
        } else {
            5000
        }
    }
}

struct Report {
    rows: Vec<(String, Measured, String)>,
}

impl Report {
    fn add(&mut self, workload: &str, measured: Measured, note: &str) {
        println!(
            "  {workload:<44} orm {:>10}  raw {:>10}  ratio {:.2} (paired {:.2}) {note}",
            fmt(measured.orm),
            fmt(measured.raw),
            ratio(measured.orm, measured.raw),
            measured.paired
        );
        self.rows.push((workload.to_owned(), measured, note.to_owned()));
    }

    fn print(&self) {
        println!();
        println!("| workload | ORM median | raw median | ratio ORM/raw | paired ratio | note |");
        println!("|---|---:|---:|---:|---:|---|");
        for (workload, measured, note) in &self.rows {
            println!(
                "| {workload} | {} | {} | {:.2} | {:.2} | {note} |",
                fmt(measured.orm),
                fmt(measured.raw),
                ratio(measured.orm, measured.raw),
                measured.paired
            );
        }
    }
}

fn ratio(orm: Duration, raw: Duration) -> f64 {
    orm.as_secs_f64() / raw.as_secs_f64().max(1e-9)
}

fn fmt(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1_000.0 {
        format!("{us:.1} µs")
    } else if us < 1_000_000.0 {
        format!("{:.2} ms", us / 1e3)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// Samples each side takes at least, however long they take: the median of
/// fewer moved by several hundredths between runs of the longer workloads
/// (1,000 gets, streaming), whose samples are each a tenth of a second or
/// more. With 15, the ratio of 1,000 gets still ranged from 0.98 to 1.08
/// over four runs while its paired ratio stayed within 1.02 to 1.06.
const MIN_SAMPLES: usize = 31;

/// Both sides' medians, and the median of the ratios of samples taken one
/// after the other: the machine's speed drifts over seconds (the server's
/// round trip, other tenants), and a pair of adjacent samples shares its
/// state where the two medians may not.
struct Measured {
    orm: Duration,
    raw: Duration,
    paired: f64,
}

/// Samples both sides alternately (so drift hits both alike) until the
/// budget is spent. `setup` runs untimed before every sample of either
/// side.
async fn compare(
    config: &Config,
    mut setup: impl AsyncFnMut(),
    mut orm: impl AsyncFnMut() -> Duration,
    mut raw: impl AsyncFnMut() -> Duration,
) -> Measured {
    // One warm-up each: connections, prepared statements, caches.
    setup().await;
    orm().await;
    setup().await;
    raw().await;
    let (mut orm_samples, mut raw_samples) = (Vec::new(), Vec::new());
    let started = Instant::now();
    while orm_samples.len() < config.samples_cap()
        && (orm_samples.len() < MIN_SAMPLES || started.elapsed() < config.budget * 2)
    {
        // Alternate which side goes first, so neither always runs on caches
        // the other warmed.
        if orm_samples.len() % 2 == 0 {
            setup().await;
            orm_samples.push(orm().await);
            setup().await;
            raw_samples.push(raw().await);
        } else {
            setup().await;
            raw_samples.push(raw().await);
            setup().await;
            orm_samples.push(orm().await);
        }
        if config.smoke {
            break;
        }
    }
    let mut paired: Vec<f64> = orm_samples
        .iter()
        .zip(&raw_samples)
        .map(|(o, r)| ratio(*o, *r))
        .collect();
    paired.sort_by(f64::total_cmp);
    Measured {
        paired: paired[paired.len() / 2],
        orm: median(orm_samples),
        raw: median(raw_samples),
    }
}

/// Streams rows of (id, name, email, age) into `table` by binary COPY, as
/// a hand-written program would with tokio-postgres' writer.
async fn copy_users<'a>(
    raw: &orm::tokio_postgres::Client,
    table: &str,
    rows: impl Iterator<Item = [&'a (dyn ToSql + Sync); 4]>,
) {
    let sink = raw
        .copy_in(&format!("COPY {table} (id, name, email, age) FROM STDIN BINARY"))
        .await
        .unwrap();
    let mut writer = pin!(BinaryCopyInWriter::new(
        sink,
        &[Type::INT8, Type::TEXT, Type::TEXT, Type::INT4]
    ));
    for fields in rows {
        writer.as_mut().write(&fields).await.unwrap();
    }
    writer.finish().await.unwrap();
}

/// Runs a prepared statement and hands each row to `on_row` as it arrives:
/// the fastest hand-written form, never collecting a `Vec<Row>` first.
async fn each_raw_row<P, I>(
    raw: &orm::tokio_postgres::Client,
    statement: &Statement,
    params: I,
    mut on_row: impl FnMut(Row),
) where
    P: BorrowToSql,
    I: IntoIterator<Item = P>,
    I::IntoIter: ExactSizeIterator,
{
    let stream = raw.query_raw(statement, params).await.unwrap();
    let mut stream = pin!(stream);
    while let Some(row) = futures_util::TryStreamExt::try_next(&mut stream).await.unwrap() {
        on_row(row);
    }
}

/// Empties `users` and `posts` and fills `users` with `count` rows, with
/// fresh statistics for the planner.
async fn fill_users(engine: &Engine, count: usize) {
    let conn = engine.connect().await.unwrap();
    conn.client()
        .batch_execute(&format!(
            "TRUNCATE users, posts RESTART IDENTITY; \
             INSERT INTO users (name, email, age) SELECT 'user ' || i, 'user' || i || '@example.com', i % 90 \
             FROM generate_series(1, {count}) AS i; \
             ANALYZE users"
        ))
        .await
        .unwrap();
}

/// Every user, loaded by hand, with the connection they came on, still
/// checked out; in a transaction opened first when `begin`, as the session
/// opens its own with its load.
async fn load_users_by_hand(engine: &Engine, begin: bool) -> (orm::Connection, Vec<User>) {
    let conn = engine.connect().await.unwrap();
    if begin {
        conn.client().batch_execute("BEGIN").await.unwrap();
    }
    let users = conn
        .client()
        .query("SELECT id, name, email, age FROM users", &[])
        .await
        .unwrap()
        .iter()
        .map(user_from_row)
        .collect();
    (conn, users)
}

/// The count of `users` rows whose age is `age`, or of all rows.
async fn count_users(engine: &Engine, age: Option<i32>) -> usize {
    let conn = engine.connect().await.unwrap();
    let count: i64 = conn
        .client()
        .query_one("SELECT count(*) FROM users WHERE $1::int4 IS NULL OR age = $1", &[&age])
        .await
        .unwrap()
        .get(0);
    count as usize
}

/// Times one future.
async fn timed<F: Future<Output = ()>>(work: F) -> Duration {
    let started = Instant::now();
    work.await;
    started.elapsed()
}

struct Bench {
    config: Config,
    engine: Engine,
    /// The default session factory, for writes.
    sessions: SessionMaker,
    /// An autocommit factory for lone reads: like the raw side, they run
    /// outside an explicit transaction.
    readers: SessionMaker,
    /// Raw tokio-postgres runs on the pool's one connection too, so both
    /// sides talk to the same server backend: latency differs between
    /// backends far more than between the two ways of calling them.
    report: Report,
}

impl Bench {
    async fn sql(&self, sql: &str) {
        self.engine
            .connect()
            .await
            .unwrap()
            .client()
            .batch_execute(sql)
            .await
            .expect(sql);
    }

    /// Prepares a statement on the pool's one connection, for the raw side.
    async fn prepare(&self, sql: &str) -> Statement {
        let conn = self.engine.connect().await.unwrap();
        conn.client().prepare(sql).await.unwrap()
    }

    /// Compares one read: the ORM's in an autocommit session made and
    /// closed inside the timing, as a request handler would; the raw one on
    /// the pool's connection, checked out before the timing starts.
    async fn compare_reads(
        &self,
        mut orm: impl AsyncFnMut(&mut Session),
        mut raw: impl AsyncFnMut(&orm::tokio_postgres::Client),
    ) -> Measured {
        compare(
            &self.config,
            async || {},
            async || {
                timed(async {
                    let mut session = self.readers.session();
                    orm(&mut session).await;
                    session.close().await.unwrap();
                })
                .await
            },
            async || {
                let conn = self.engine.connect().await.unwrap();
                timed(raw(conn.client())).await
            },
        )
        .await
    }

    async fn fill_users(&self, count: usize) {
        fill_users(&self.engine, count).await;
    }

    async fn select_all(&mut self, rows: usize) {
        self.fill_users(rows).await;
        let statement = self.prepare("SELECT id, name, email, age FROM users").await;
        // Tracked objects (identity map, change tracking), then the same rows
        // as plain values, untracked: what Diesel or SeaORM return.
        for tracked in [true, false] {
            let measured = self
                .compare_reads(
                    async |session| {
                        let loaded = if tracked {
                            session.query::<User>().all().await.unwrap().len()
                        } else {
                            session.query::<User>().values().await.unwrap().len()
                        };
                        assert_eq!(loaded, rows);
                    },
                    async |raw| {
                        let mut users: Vec<User> = Vec::new();
                        each_raw_row(raw, &statement, std::iter::empty::<i32>(), |row| {
                            users.push(user_from_row(&row))
                        })
                        .await;
                        assert_eq!(users.len(), rows);
                    },
                )
                .await;
            let (workload, note) = if tracked {
                (
                    format!("select all, {rows} rows"),
                    "raw: query_raw, decoded as rows arrive",
                )
            } else {
                (
                    format!("select all, {rows} rows, as values()"),
                    "untracked; raw: query_raw, decoded as rows arrive",
                )
            };
            self.report.add(&workload, measured, note);
        }
    }

    async fn get_by_primary_key(&mut self, lookups: i64) {
        self.fill_users(lookups as usize).await;
        let statement = self
            .prepare("SELECT id, name, email, age FROM users WHERE id = $1")
            .await;
        let measured = self
            .compare_reads(
                async |session| {
                    for id in 1..=lookups {
                        let user = session.get::<User>(id).await.unwrap().unwrap();
                        assert_eq!(user.read().id, id);
                    }
                },
                async |raw| {
                    for id in 1..=lookups {
                        let user = user_from_row(&raw.query_one(&statement, &[&id]).await.unwrap());
                        assert_eq!(user.id, id);
                    }
                },
            )
            .await;
        self.report
            .add(&format!("get by primary key, {lookups} times"), measured, "");
    }

    async fn medium_query(&mut self) {
        self.fill_users(1_000).await;
        self.sql(
            "INSERT INTO posts (user_id, title, score) SELECT 1 + i % 1000, 'post ' || i, (i * 7919) % 1000 \
             FROM generate_series(1, 10000) AS i; ANALYZE posts",
        )
        .await;
        let statement = self
            .prepare(
                "SELECT u.id, u.name, u.email, u.age, p.id, p.user_id, p.title, p.score \
                 FROM users u JOIN posts p ON p.user_id = u.id \
                 WHERE u.age > $1 AND p.score > $2 ORDER BY p.score DESC, p.id ASC LIMIT $3",
            )
            .await;
        let measured = self
            .compare_reads(
                async |session| {
                    let pairs = session
                        .query::<User>()
                        .join::<Post>()
                        .filter(User::age.gt(30))
                        .filter(Post::score.gt(500))
                        .order_by(Post::score.desc())
                        .order_by(Post::id)
                        .limit(20)
                        .all()
                        .await
                        .unwrap();
                    assert_eq!(pairs.len(), 20);
                },
                async |raw| {
                    let pairs: Vec<(User, Post)> = raw
                        .query(&statement, &[&30i32, &500i32, &20i64])
                        .await
                        .unwrap()
                        .iter()
                        .map(|row| (user_from_row(row), post_from_row_at(row, 4)))
                        .collect();
                    assert_eq!(pairs.len(), 20);
                },
            )
            .await;
        self.report.add(
            "users JOIN posts, filter + order + limit 20",
            measured,
            "1,000 users, 10,000 posts",
        );
    }

    /// Posts with their authors, by one JOIN from the child side: each row
    /// a post and its user. Posts 1 to 1,000 belong to 1,000 different
    /// users, so every row brings two objects new to the session: the
    /// hardest case for the identity map, which gains nothing from a
    /// repeated author here. Expects the data
    /// `medium_query` leaves (posts spread over 1,000 users). The raw side
    /// decodes both on every row, as a hand-written loop would.
    async fn posts_with_authors(&mut self, posts: i64) {
        let statement = self
            .prepare(
                "SELECT p.id, p.user_id, p.title, p.score, u.id, u.name, u.email, u.age \
                 FROM posts p JOIN users u ON u.id = p.user_id \
                 WHERE p.id <= $1 ORDER BY p.id ASC",
            )
            .await;
        let measured = self
            .compare_reads(
                async |session| {
                    let rows = session
                        .query::<Post>()
                        .join::<User>()
                        .filter(Post::id.le(posts))
                        .order_by(Post::id)
                        .all()
                        .await
                        .unwrap();
                    assert_eq!(rows.len(), posts as usize);
                },
                async |raw| {
                    let mut loaded: Vec<(Post, User)> = Vec::new();
                    each_raw_row(raw, &statement, [posts], |row| {
                        loaded.push((post_from_row_at(&row, 0), user_from_row_at(&row, 4)))
                    })
                    .await;
                    assert_eq!(loaded.len(), posts as usize);
                },
            )
            .await;
        self.report.add(
            &format!("{posts} posts with their authors (JOIN from the child side)"),
            measured,
            "every post by a different user: two new objects per row",
        );
    }

    /// Users with their posts, by one LEFT JOIN (SQLAlchemy's joined eager
    /// loading), grouped into each user's list of posts. Expects the data
    /// `medium_query` leaves: 1,000 users with 10 posts each.
    async fn users_with_posts(&mut self, users: i64) {
        let statement = self
            .prepare(
                "SELECT u.id, u.name, u.email, u.age, p.id, p.user_id, p.title, p.score \
                 FROM users u LEFT JOIN posts p ON p.user_id = u.id \
                 WHERE u.id <= $1 ORDER BY u.id ASC, p.id ASC",
            )
            .await;
        let measured = self
            .compare_reads(
                async |session| {
                    let rows = session
                        .query::<User>()
                        .left_join::<Post>()
                        .filter(User::id.le(users))
                        .order_by(User::id)
                        .order_by(Post::id)
                        .all()
                        .await
                        .unwrap();
                    let mut loaded: Vec<(Tracked<User>, Vec<Tracked<Post>>)> = Vec::new();
                    for (user, post) in rows {
                        match loaded.last_mut() {
                            Some((last, posts)) if last.ptr_eq(&user) => posts.extend(post),
                            _ => loaded.push((user, post.into_iter().collect())),
                        }
                    }
                    assert_eq!(loaded.len(), users as usize);
                },
                async |raw| {
                    let mut loaded: Vec<(User, Vec<Post>)> = Vec::new();
                    each_raw_row(raw, &statement, [users], |row| {
                        let user_id: i64 = row.get(0);
                        if loaded.last().is_none_or(|(user, _)| user.id != user_id) {
                            loaded.push((user_from_row(&row), Vec::new()));
                        }
                        if row.get::<_, Option<i64>>(4).is_some() {
                            let (_, posts) = loaded.last_mut().expect("pushed above");
                            posts.push(post_from_row_at(&row, 4));
                        }
                    })
                    .await;
                    assert_eq!(loaded.len(), users as usize);
                },
            )
            .await;
        self.report.add(
            &format!("{users} users with their posts (LEFT JOIN)"),
            measured,
            "10 posts each; grouped per user",
        );
    }

    async fn insert(&mut self, rows: usize) {
        let single = self
            .prepare("INSERT INTO new_users (name, email, age) VALUES ($1, $2, $3) RETURNING id")
            .await;
        let (sessions, engine) = (&self.sessions, &self.engine);
        let truncate = || async {
            let conn = engine.connect().await.unwrap();
            let raw = conn.client();
            raw.batch_execute("TRUNCATE new_users RESTART IDENTITY").await.unwrap();
        };
        let orm_insert = || async {
            let users: Vec<NewUser> = (0..rows).map(new_user).collect();
            timed(async {
                let mut session = sessions.session();
                let tracked = session.add_all(users);
                session.commit().await.unwrap();
                assert!(tracked[rows - 1].read().id > 0);
            })
            .await
        };

        // Against one INSERT ... RETURNING per row, in one transaction.
        let vs_single_inserts = compare(&self.config, truncate, orm_insert, || async {
            let conn = engine.connect().await.unwrap();
            let raw = conn.client();
            let users: Vec<NewUser> = (0..rows).map(new_user).collect();
            timed(async {
                raw.batch_execute("BEGIN").await.unwrap();
                for user in &users {
                    let row = raw
                        .query_one(&single, &[&user.name, &user.email, &user.age])
                        .await
                        .unwrap();
                    let _id: i64 = row.get(0);
                }
                raw.batch_execute("COMMIT").await.unwrap();
                // Freeing the objects is part of the work, as it is for the
                // ORM's session.
                drop(users);
            })
            .await
        })
        .await;
        self.report.add(
            &format!("insert {rows} in one flush"),
            vs_single_inserts,
            "raw: one INSERT ... RETURNING per row",
        );
        if rows == 1 {
            return;
        }

        // Against a hand-written multi-row INSERT ... VALUES ... RETURNING.
        let vs_multi_row_insert = compare(&self.config, truncate, orm_insert, || async {
            let conn = engine.connect().await.unwrap();
            let raw = conn.client();
            let users: Vec<NewUser> = (0..rows).map(new_user).collect();
            timed(async {
                // 65,535 parameters at most per statement: 3 per row.
                for chunk in users.chunks(20_000) {
                    let mut sql = String::from("INSERT INTO new_users (name, email, age) VALUES ");
                    let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(chunk.len() * 3);
                    for (i, user) in chunk.iter().enumerate() {
                        if i > 0 {
                            sql.push(',');
                        }
                        sql.push_str(&format!("(${}, ${}, ${})", i * 3 + 1, i * 3 + 2, i * 3 + 3));
                        params.extend([&user.name as &(dyn ToSql + Sync), &user.email, &user.age]);
                    }
                    sql.push_str(" RETURNING id");
                    let ids = raw.query(&sql, &params).await.unwrap();
                    assert_eq!(ids.len(), chunk.len());
                }
                drop(users);
            })
            .await
        })
        .await;
        self.report.add(
            &format!("insert {rows} in one flush"),
            vs_multi_row_insert,
            "raw: hand-written multi-row INSERT ... RETURNING",
        );

        // Against binary COPY, the fastest way in (no keys come back).
        let vs_copy = compare(&self.config, truncate, orm_insert, || async {
            let conn = engine.connect().await.unwrap();
            let raw = conn.client();
            let users: Vec<NewUser> = (0..rows).map(new_user).collect();
            timed(async {
                let sink = raw
                    .copy_in("COPY new_users (name, email, age) FROM STDIN BINARY")
                    .await
                    .unwrap();
                let mut writer = pin!(BinaryCopyInWriter::new(sink, &[Type::TEXT, Type::TEXT, Type::INT4]));
                for user in &users {
                    writer
                        .as_mut()
                        .write(&[&user.name, &user.email, &user.age])
                        .await
                        .unwrap();
                }
                writer.finish().await.unwrap();
                drop(users);
            })
            .await
        })
        .await;
        self.report.add(
            &format!("insert {rows} in one flush"),
            vs_copy,
            "raw: binary COPY, no keys returned",
        );

        // Against the same work by hand: take the keys from the sequence,
        // give them to the structs, then binary COPY with the keys.
        let reserve = self
            .prepare(
                "SELECT ARRAY(SELECT nextval('new_users_id_seq') FROM (SELECT generate_series(1, $1::bigint)) AS g)",
            )
            .await;
        let vs_keys_then_copy = compare(&self.config, truncate, orm_insert, || async {
            let conn = engine.connect().await.unwrap();
            let raw = conn.client();
            let mut users: Vec<NewUser> = (0..rows).map(new_user).collect();
            timed(async {
                let keys: Vec<i64> = raw.query_one(&reserve, &[&(rows as i64)]).await.unwrap().get(0);
                for (user, key) in users.iter_mut().zip(keys) {
                    user.id = key;
                }
                let fields = users
                    .iter()
                    .map(|u| [&u.id as &(dyn ToSql + Sync), &u.name, &u.email, &u.age]);
                copy_users(raw, "new_users", fields).await;
                assert!(users[rows - 1].id > 0);
                drop(users);
            })
            .await
        })
        .await;
        self.report.add(
            &format!("insert {rows} in one flush"),
            vs_keys_then_copy,
            "raw: keys taken from the sequence, then binary COPY",
        );
        let _ = engine;
    }

    async fn insert_keyed(&mut self, rows: usize) {
        let (sessions, engine) = (&self.sessions, &self.engine);
        let keyed = |i: usize| KeyedUser {
            id: i as i64 + 1,
            name: format!("user {i}"),
            email: format!("user{i}@example.com"),
            age: (i % 90) as i32,
        };
        let measured = compare(
            &self.config,
            || async {
                let conn = engine.connect().await.unwrap();
                conn.client().batch_execute("TRUNCATE keyed_users").await.unwrap();
            },
            || async {
                let users: Vec<KeyedUser> = (0..rows).map(keyed).collect();
                timed(async {
                    let mut session = sessions.session();
                    session.add_all(users);
                    session.commit().await.unwrap();
                })
                .await
            },
            || async {
                let users: Vec<KeyedUser> = (0..rows).map(keyed).collect();
                let conn = engine.connect().await.unwrap();
                let raw = conn.client();
                timed(async {
                    let fields = users
                        .iter()
                        .map(|u| [&u.id as &(dyn ToSql + Sync), &u.name, &u.email, &u.age]);
                    copy_users(raw, "keyed_users", fields).await;
                    drop(users);
                })
                .await
            },
        )
        .await;
        self.report.add(
            &format!("insert {rows} with keys set by the application"),
            measured,
            "binary COPY",
        );
    }

    async fn update(&mut self, rows: usize) {
        self.fill_users(rows).await;
        let single = self.prepare("UPDATE users SET age = $1 WHERE id = $2").await;
        let batched = self
            .prepare(
                "UPDATE users SET age = v.age FROM unnest($1::int8[], $2::int4[]) AS v(id, age) \
                 WHERE users.id = v.id",
            )
            .await;
        let (sessions, engine) = (&self.sessions, &self.engine);
        let round = std::cell::Cell::new(0i32);
        // Every sample sets a new age on every row, and checks that it did.
        let next_age = || {
            round.set(round.get() + 1);
            round.get() % 90
        };
        let check = async |age: i32| {
            assert_eq!(
                count_users(engine, Some(age)).await,
                rows,
                "every change reached the table"
            );
        };
        let orm_update = async || {
            let age = next_age();
            let mut session = sessions.session();
            let users = session.query::<User>().all().await.unwrap();
            let took = timed(async {
                for user in &users {
                    user.write().age = age;
                }
                session.commit().await.unwrap();
            })
            .await;
            session.close().await.unwrap();
            check(age).await;
            took
        };

        // Against one UPDATE per row, in one transaction.
        let vs_single = compare(
            &self.config,
            async || {},
            orm_update,
            async || {
                let age = next_age();
                // The transaction opens before the timing, as the ORM's
                // does (its BEGIN goes out with the untimed load).
                let (conn, mut users) = load_users_by_hand(engine, true).await;
                let raw = conn.client();
                let took = timed(async {
                    for user in &mut users {
                        user.age = age;
                        raw.execute(&single, &[&user.age, &user.id]).await.unwrap();
                    }
                    raw.batch_execute("COMMIT").await.unwrap();
                })
                .await;
                drop(conn);
                check(age).await;
                took
            },
        )
        .await;
        self.report.add(
            &format!("update {rows} changed objects in one flush"),
            vs_single,
            "raw: one UPDATE per row",
        );

        // Against the hand-written batch: one UPDATE ... FROM unnest of the
        // keys and the new values, as the flush sends.
        let vs_batched = compare(
            &self.config,
            async || {},
            orm_update,
            async || {
                let age = next_age();
                let (conn, mut users) = load_users_by_hand(engine, false).await;
                let raw = conn.client();
                let took = timed(async {
                    for user in &mut users {
                        user.age = age;
                    }
                    let ids: Vec<i64> = users.iter().map(|u| u.id).collect();
                    let ages: Vec<i32> = users.iter().map(|u| u.age).collect();
                    let updated = raw.execute(&batched, &[&ids, &ages]).await.unwrap();
                    assert_eq!(updated as usize, rows);
                })
                .await;
                drop(conn);
                check(age).await;
                took
            },
        )
        .await;
        self.report.add(
            &format!("update {rows} changed objects in one flush"),
            vs_batched,
            "raw: one UPDATE ... FROM unnest of all rows",
        );
    }

    /// Deletes every loaded user in one flush. The rows come back, and the
    /// statistics with them, before every sample.
    async fn delete(&mut self, rows: usize) {
        self.fill_users(rows).await;
        let single = self.prepare("DELETE FROM users WHERE id = $1").await;
        let batched = self.prepare("DELETE FROM users WHERE id = ANY($1)").await;
        let (sessions, engine) = (&self.sessions, &self.engine);
        let refill = async || fill_users(engine, rows).await;
        let check = async || assert_eq!(count_users(engine, None).await, 0, "every row was deleted");
        let orm_delete = async || {
            let mut session = sessions.session();
            let users = session.query::<User>().all().await.unwrap();
            let took = timed(async {
                for user in &users {
                    session.delete(user).unwrap();
                }
                session.commit().await.unwrap();
            })
            .await;
            session.close().await.unwrap();
            check().await;
            took
        };

        // Against one DELETE per row, in one transaction.
        let vs_single = compare(&self.config, refill, orm_delete, async || {
            let (conn, users) = load_users_by_hand(engine, true).await;
            let raw = conn.client();
            let took = timed(async {
                for user in &users {
                    raw.execute(&single, &[&user.id]).await.unwrap();
                }
                raw.batch_execute("COMMIT").await.unwrap();
            })
            .await;
            drop(conn);
            check().await;
            took
        })
        .await;
        self.report.add(
            &format!("delete {rows} loaded objects in one flush"),
            vs_single,
            "raw: one DELETE per row",
        );

        // Against the hand-written batch: one DELETE of every key at once.
        let vs_batched = compare(&self.config, refill, orm_delete, async || {
            let (conn, users) = load_users_by_hand(engine, false).await;
            let raw = conn.client();
            let took = timed(async {
                let ids: Vec<i64> = users.iter().map(|u| u.id).collect();
                let deleted = raw.execute(&batched, &[&ids]).await.unwrap();
                assert_eq!(deleted as usize, rows);
            })
            .await;
            drop(conn);
            check().await;
            took
        })
        .await;
        self.report.add(
            &format!("delete {rows} loaded objects in one flush"),
            vs_batched,
            "raw: one DELETE ... WHERE id = ANY($1)",
        );
    }

    async fn stream(&mut self, rows: usize) {
        self.fill_users(rows).await;
        let statement = self.prepare("SELECT id, name, email, age FROM users").await;
        let (sessions, engine) = (&self.readers, &self.engine);
        let orm_peak = std::cell::Cell::new(0);
        let raw_peak = std::cell::Cell::new(0);
        let base = resident_kib();
        let streamed = compare(
            &self.config,
            || async {},
            || async {
                let mut seen = 0usize;
                let mut peak = 0;
                let took = timed(async {
                    let mut session = sessions.session();
                    session
                        .query::<User>()
                        .for_each(|user| {
                            seen += 1;
                            if seen % 50_000 == 0 {
                                peak = peak.max(resident_kib());
                            }
                            std::hint::black_box(user);
                            Ok(())
                        })
                        .await
                        .unwrap();
                    session.close().await.unwrap();
                })
                .await;
                assert_eq!(seen, rows);
                orm_peak.set(orm_peak.get().max(peak));
                took
            },
            || async {
                let conn = engine.connect().await.unwrap();
                let raw = conn.client();
                let mut seen = 0usize;
                let mut peak = 0;
                let took = timed(async {
                    each_raw_row(raw, &statement, std::iter::empty::<i32>(), |row| {
                        seen += 1;
                        if seen % 50_000 == 0 {
                            peak = peak.max(resident_kib());
                        }
                        std::hint::black_box(user_from_row(&row));
                    })
                    .await;
                })
                .await;
                assert_eq!(seen, rows);
                raw_peak.set(raw_peak.get().max(peak));
                took
            },
        )
        .await;
        let note = format!(
            "peak RSS while streaming: orm {} MiB, raw {} MiB (process at start: {} MiB)",
            orm_peak.get().max(base) / 1024,
            raw_peak.get().max(base) / 1024,
            base / 1024
        );
        self.report.add(&format!("stream {rows} rows"), streamed, &note);
    }
}

/// Resident memory of this process, in KiB (Linux).
fn resident_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse().ok())
        })
        .unwrap_or(0)
}

/// Pins this process and the server backend behind the pool's one
/// connection (`ORM_BENCH_PIN`). `1`: both on CPU 0. Each round trip is then
/// a switch between two processes on one core rather than a wakeup on
/// another, so the times are the two sides' CPU work, and the ratio is the
/// ORM's CPU cost: the regime of a busy machine, where round trips take
/// microseconds. `split`: the backend on CPU 0 and this process on CPU 1,
/// so every round trip crosses cores, as on an idle machine. Without it,
/// which regime a workload runs in is the scheduler's choice, and may change
/// from one sample to the next.
async fn pin_cpus(engine: &Engine, split: bool) {
    let conn = engine.connect().await.expect("a connection");
    let backend: i32 = conn
        .client()
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("the backend's pid")
        .get(0);
    let this_cpu = if split { "1" } else { "0" };
    for (pid, cpu) in [(backend as u32, "0"), (std::process::id(), this_cpu)] {
        let pinned = std::process::Command::new("taskset")
            .args(["-a", "-p", "-c", cpu, &pid.to_string()])
            .stdout(std::process::Stdio::null())
            .status();
        assert!(
            matches!(pinned, Ok(status) if status.success()),
            "ORM_BENCH_PIN needs taskset (util-linux), a CPU {cpu}, and the right to set the affinity of process {pid}: {pinned:?}"
        );
    }
    println!("pinned: server backend {backend} on CPU 0, this process on CPU {this_cpu}");
}

/// The names `ORM_BENCH_ONLY` takes.
const WORKLOADS: [&str; 8] = [
    "stream",
    "select",
    "get",
    "join",
    "insert",
    "insert_keyed",
    "update",
    "delete",
];

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let smoke = std::env::var_os("ORM_BENCH_SMOKE").is_some();
    // Both settings are checked before anything starts.
    let setting = |name: &str| match std::env::var(name) {
        Ok(value) => Some(value),
        Err(std::env::VarError::NotPresent) => None,
        Err(std::env::VarError::NotUnicode(value)) => panic!("{name}={value:?} is not UTF-8"),
    };
    let config = Config {
        smoke,
        only: setting("ORM_BENCH_ONLY")
            .unwrap_or_default()
            .split(',')
            .filter(|w| !w.is_empty())
            .map(str::to_owned)
            .collect(),
        budget: Duration::from_millis(if smoke { 0 } else { 1_500 }),
    };
    if let Some(unknown) = config.only.iter().find(|w| !WORKLOADS.contains(&w.as_str())) {
        panic!("ORM_BENCH_ONLY names {unknown:?}, not a workload; the workloads: {WORKLOADS:?}");
    }
    // Whether to pin, and whether to split the two processes over two CPUs.
    let pin = match setting("ORM_BENCH_PIN").as_deref() {
        None => None,
        Some("1") => Some(false),
        Some("split") => Some(true),
        Some(other) => panic!("ORM_BENCH_PIN={other:?}: expected 1 (one CPU) or split (two)"),
    };
    let server = DevServer::start().await.expect("a PostgreSQL server");
    let database = TestDatabase::create(&server).await.expect("a scratch database");
    let engine = Engine::builder(database.url()).pool_size(1).build().expect("engine");
    BenchBase::create_all(&engine).await.expect("create_all");
    if let Some(split) = pin {
        pin_cpus(&engine, split).await;
    }

    let mut bench = Bench {
        config,
        sessions: sessionmaker(&engine),
        readers: sessionmaker(&engine).autocommit(true),
        engine,
        report: Report { rows: Vec::new() },
    };
    println!("orm vs raw tokio-postgres{}", if smoke { " (smoke run)" } else { "" });
    let scale = |full: usize, small: usize| if smoke { small } else { full };

    let wants = |bench: &Bench, workload: &str| bench.config.wants(workload);
    // First, while the process is small, so its peak memory means something.
    if wants(&bench, "stream") {
        bench.stream(scale(1_000_000, 10_000)).await;
    }
    if wants(&bench, "select") {
        for rows in [1, 100, scale(10_000, 1_000)] {
            bench.select_all(rows).await;
        }
    }
    if wants(&bench, "get") {
        bench.get_by_primary_key(scale(1_000, 10) as i64).await;
    }
    if wants(&bench, "join") {
        bench.medium_query().await;
        bench.users_with_posts(scale(100, 10) as i64).await;
        bench.posts_with_authors(scale(1_000, 10) as i64).await;
    }
    if wants(&bench, "insert") {
        for rows in [1, 100, scale(10_000, 1_000)] {
            bench.insert(rows).await;
        }
    }
    if wants(&bench, "insert_keyed") {
        bench.insert_keyed(scale(10_000, 1_000)).await;
    }
    if wants(&bench, "update") {
        bench.update(scale(1_000, 10)).await;
    }
    if wants(&bench, "delete") {
        bench.delete(scale(1_000, 10)).await;
    }
    bench.report.print();

    drop(bench);
    database.drop_database().await.expect("drop the scratch database");
}
