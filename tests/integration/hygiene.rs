//! The derive's output must compile next to user code that shadows the
//! prelude's names, and under a renamed `orm` crate.

#[allow(dead_code, non_camel_case_types)]
mod shadowed_prelude {
    // Names generated code must not pick up from the caller's scope.
    type Result = ();
    type Option = ();
    type String = ();
    type Vec = ();
    type Box = ();
    struct Some;
    struct None;
    struct Ok;
    struct Err;
    trait Clone {}
    trait Model {}

    #[derive(orm::Model, Debug, ::core::clone::Clone)]
    #[orm(table = "shadowed")]
    pub struct Shadowed {
        #[orm(primary_key, identity)]
        pub id: i64,
        pub label: ::std::string::String,
        #[orm(default = "'x'")]
        pub note: ::core::option::Option<::std::string::String>,
        #[orm(foreign_key = Self::id)]
        pub parent: ::core::option::Option<i64>,
        pub r#type: i32,
    }
}

mod renamed_crate {
    extern crate orm as renamed_orm;

    renamed_orm::declarative_base!(pub RenamedBase);

    #[derive(renamed_orm::Model, Debug, Clone)]
    #[orm(crate = "renamed_orm", base = RenamedBase, table = "renamed")]
    pub struct Renamed {
        #[orm(primary_key)]
        pub id: i64,
    }

    #[test]
    fn a_renamed_crate_path_is_honoured() {
        use renamed_orm::Model;
        assert_eq!(Renamed::TABLE.name, "renamed");
        let tables: Vec<&str> = RenamedBase::metadata()
            .unwrap()
            .tables()
            .iter()
            .map(|t| t.name)
            .collect();
        assert_eq!(tables, ["renamed"]);
        let _ = Renamed { id: 1 }.id;
    }
}

#[tokio::test]
async fn a_model_next_to_shadowed_names_round_trips() {
    use orm::prelude::*;
    use shadowed_prelude::Shadowed;

    let db = crate::common::test_db().await;
    let metadata = orm::Base::metadata().unwrap();
    let table = metadata.tables().iter().find(|t| t.name == "shadowed").unwrap();
    orm::MetaData::from_tables(vec![*table])
        .unwrap()
        .create_all(&db.engine)
        .await
        .unwrap();
    let mut session = sessionmaker(&db.engine).session();
    let row = session.add(Shadowed {
        id: 0,
        label: "a".into(),
        note: None,
        parent: None,
        r#type: 7,
    });
    session.commit().await.unwrap();
    let loaded = session.get::<Shadowed>(row.read().id).await.unwrap().unwrap();
    assert_eq!(loaded.read().note.as_deref(), Some("x"));
    assert_eq!(loaded.read().r#type, 7);
    assert_eq!(Shadowed::r#type.name, "type");
    assert_eq!(loaded.read().label, "a");
    assert_eq!(loaded.read().parent, None);
}
