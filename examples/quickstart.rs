//! The SQLAlchemy tutorial, in Rust: an engine, a session factory and a
//! declarative base (`database`), two related models (`models`), their
//! tables created from the models, a few rows added and committed, then
//! queried back and printed.
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! No configuration needed: the server is `DATABASE_URL` if set, else the
//! local one at 127.0.0.1:5432, else a throwaway cluster started from the
//! machine's `initdb`/`pg_ctl`. The example works in a scratch database of
//! its own and drops it at the end.

mod database {
    //! `database.py`: the engine, `SessionLocal` and the base.
    use orm::dev::{DevServer, TestDatabase};
    use orm::{Engine, SessionMaker};

    pub use orm::Base;

    /// What `database.py` sets up, plus the server and scratch database
    /// behind it, which must outlive the engine.
    pub struct Database {
        pub engine: Engine,
        /// `SessionLocal` in the tutorial.
        pub session_local: SessionMaker,
        pub scratch: TestDatabase,
        pub server: DevServer,
    }

    pub async fn connect() -> orm::Result<Database> {
        let server = DevServer::start().await?;
        let scratch = TestDatabase::create(&server).await?;
        // engine = create_engine(SQLALCHEMY_DATABASE_URL)
        let engine = orm::create_engine(scratch.url())?;
        // SessionLocal = sessionmaker(autocommit=False, autoflush=False, bind=engine)
        let session_local = orm::sessionmaker(&engine).autocommit(false).autoflush(false);
        Ok(Database {
            engine,
            session_local,
            scratch,
            server,
        })
    }
}

mod models {
    //! `models.py`: a user owns items.
    use orm::Model;

    #[derive(Model, Debug, Clone)]
    #[orm(table = "users")]
    pub struct User {
        #[orm(primary_key, identity)]
        pub id: i64,
        #[orm(unique, index, length = 255)]
        pub email: String,
        pub hashed_password: String,
        #[orm(default = "true")]
        pub is_active: Option<bool>,
    }

    #[derive(Model, Debug, Clone)]
    #[orm(table = "items")]
    pub struct Item {
        #[orm(primary_key, identity)]
        pub id: i64,
        #[orm(index)]
        pub title: String,
        #[orm(index)]
        pub description: Option<String>,
        #[orm(foreign_key = User::id, on_delete = "cascade")]
        pub owner_id: i64,
    }
}

use database::Base;
use models::{Item, User};

#[tokio::main]
async fn main() {
    if let Err(error) = run().await {
        eprintln!("quickstart failed: {error}");
        std::process::exit(1);
    }
}

async fn run() -> orm::Result<()> {
    let db = database::connect().await?;
    let where_ = if db.server.is_throwaway() {
        "a throwaway cluster"
    } else {
        "the configured server"
    };
    println!("Using scratch database {} on {where_}", db.scratch.name());

    // Base.metadata.create_all(bind=engine)
    for statement in Base::create_all_sql()? {
        println!("{statement};");
    }
    Base::create_all(&db.engine).await?;

    // with SessionLocal() as session: ... session.add(...); session.commit()
    let mut session = db.session_local.session();
    let sandy = session.add(User {
        id: 0,
        email: "sandy@example.com".into(),
        hashed_password: "notreallyhashed".into(),
        is_active: None,
    });
    let patrick = session.add(User {
        id: 0,
        email: "patrick@example.com".into(),
        hashed_password: "notreallyhashed".into(),
        is_active: Some(false),
    });
    // Flush to learn the users' generated ids before adding their items.
    session.flush().await?;
    let (sandy_id, patrick_id) = (sandy.read().id, patrick.read().id);
    session.add_all([
        Item {
            id: 0,
            title: "Karate gear".into(),
            description: Some("For practice with SpongeBob".into()),
            owner_id: sandy_id,
        },
        Item {
            id: 0,
            title: "Treedome".into(),
            description: None,
            owner_id: sandy_id,
        },
        Item {
            id: 0,
            title: "Rock".into(),
            description: Some("Home".into()),
            owner_id: patrick_id,
        },
    ]);
    session.commit().await?;

    // session.query(User).filter(User.email == "sandy@example.com").first()
    let mut session = db.session_local.session();
    let user = session
        .query::<User>()
        .filter(User::email.eq("sandy@example.com"))
        .first()
        .await?
        .ok_or(orm::Error::NotFound { table: "users".into() })?;
    println!("Found {:?}", *user.read());

    // session.query(User).offset(0).limit(100).all()
    for user in session
        .query::<User>()
        .order_by(User::id)
        .offset(0)
        .limit(100)
        .all()
        .await?
    {
        // A copy, so no borrow of the tracked object is held across the next query.
        let user = user.get();
        let items = session
            .query::<Item>()
            .filter(Item::owner_id.eq(user.id))
            .order_by(Item::title)
            .all()
            .await?;
        let titles: Vec<String> = items.iter().map(|item| item.read().title.clone()).collect();
        println!(
            "User {} <{}> active={:?} hashed_password={} owns {:?}",
            user.id, user.email, user.is_active, user.hashed_password, titles
        );
    }
    let described = session
        .query::<Item>()
        .filter(Item::description.is_not_null())
        .count()
        .await?;
    println!("{described} of the items have a description");
    for item in session.query::<Item>().order_by(Item::id).all().await? {
        let item = item.read();
        println!("Item {} {:?}: {:?}", item.id, item.title, item.description);
    }

    // session.query(Item, User).join(User).filter(User.is_active).order_by(Item.title).all()
    for (item, owner) in session
        .query::<Item>()
        .join::<User>()
        .filter(User::is_active.eq(true))
        .order_by(Item::title)
        .all()
        .await?
    {
        println!("{:?} belongs to {}", item.read().title, owner.read().email);
    }
    session.close().await?;
    drop(db.engine);
    db.scratch.drop_database().await?;
    Ok(())
}
