//! testkit against the real services: Synapse on SQLite and on PostgreSQL, throwaway databases.
#![allow(clippy::unwrap_used)] // Test helpers may panic: that is how a test fails.

use testkit::{Database, Synapse, TestDb};

/// The access token works and names the user; an admin token reaches the admin API, another not.
fn check_users(synapse: &Synapse) {
    let (admin_id, admin_token) = synapse.register_user("alice", true);
    let (user_id, user_token) = synapse.register_user("bob", false);
    let server = synapse.server_name();
    assert_eq!(admin_id, format!("@alice:{server}"));
    assert_eq!(user_id, format!("@bob:{server}"));
    let whoami = synapse.get("/_matrix/client/v3/account/whoami", Some(&user_token));
    assert_eq!(whoami.status, 200, "{}", whoami.text());
    assert_eq!(whoami.json()["user_id"], user_id);
    let admin_path = format!("/_synapse/admin/v2/users/{user_id}");
    let as_admin = synapse.get(&admin_path, Some(&admin_token));
    assert_eq!(as_admin.status, 200, "{}", as_admin.text());
    assert_eq!(as_admin.json()["name"], user_id);
    assert_eq!(synapse.get(&admin_path, Some(&user_token)).status, 403);
    assert_eq!(
        synapse
            .get("/_matrix/client/v3/account/whoami", Some("nonsense"))
            .status,
        401
    );
}

#[test]
fn synapse_on_sqlite_registers_users_and_publishes_its_key() {
    let synapse = Synapse::start("testkit.local");
    check_users(&synapse);
    let keys = synapse.server_keys();
    assert_eq!(keys["server_name"], "testkit.local");
    assert_eq!(keys["verify_keys"].as_object().unwrap().len(), 1);
    assert!(synapse.signing_key_path().is_file());
    assert!(
        synapse.config()["enable_authenticated_media"]
            .as_bool()
            .unwrap()
    );
    assert!(synapse.log().contains("Synapse now listening on TCP port"));
}

#[test]
fn synapse_on_postgres_keeps_its_tables_in_the_test_database() {
    let db = TestDb::new();
    let synapse = Synapse::builder("pg.testkit.local")
        .database(Database::Postgres(db.url().to_owned()))
        .start();
    check_users(&synapse);
    let mut client = db.client();
    let row = client
        .query_one(
            "SELECT count(*) FROM users WHERE name = '@bob:pg.testkit.local'",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 1);
    drop(synapse);
}

#[test]
fn test_databases_are_fresh_and_dropped() {
    let name;
    {
        let db = TestDb::new();
        name = db.name().to_owned();
        let mut client = db.client();
        client
            .batch_execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
            .unwrap();
        let other = TestDb::new();
        assert_ne!(other.name(), db.name());
        let mut other_client = other.client();
        assert!(other_client.query("SELECT * FROM t", &[]).is_err());
        // Open connections do not keep a database from being dropped.
        std::mem::forget(client);
    }
    let mut server =
        testkit::postgres::Client::connect(&testkit::database_url(), testkit::postgres::NoTls)
            .unwrap();
    let left = server
        .query("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .unwrap();
    assert!(left.is_empty(), "{name} was not dropped");
}
