//! A fresh PostgreSQL database per test, on the server `cargo xtask test` provides.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

const URL_VAR: &str = "MMRCTL_TEST_DATABASE_URL";

/// The server's URL, from `MMRCTL_TEST_DATABASE_URL` (set by `cargo xtask test`).
pub fn database_url() -> String {
    match std::env::var(URL_VAR) {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "{URL_VAR} is not set: run the tests with `cargo xtask test`, which provides \
             PostgreSQL (or set it to postgres://USER@HOST:PORT/DB, a user allowed to create \
             databases)"
        ),
    }
}

/// A database created for one test (UTF8, `C` collation, as Synapse requires) and dropped when
/// this is dropped, with any connections still open to it.
pub struct TestDb {
    name: String,
    url: String,
    server_url: String,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn connect(url: &str) -> postgres::Client {
    postgres::Client::connect(url, postgres::NoTls).unwrap_or_else(|e| {
        panic!(
            "cannot connect to PostgreSQL at {url}: {e}. Run the tests with `cargo xtask test`, \
             which starts a server, or point {URL_VAR} at one that runs"
        )
    })
}

impl TestDb {
    /// Creates `mmrctl_test_<pid>_<n>_<time>` on the server of `MMRCTL_TEST_DATABASE_URL`.
    pub fn new() -> Self {
        let server_url = database_url();
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!(
            "mmrctl_test_{}_{}_{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let mut client = connect(&server_url);
        client
            .batch_execute(&format!(
                "CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' \
                 LC_CTYPE 'C'"
            ))
            .unwrap_or_else(|e| panic!("cannot create database {name} at {server_url}: {e}"));
        let url = with_database(&server_url, &name);
        Self {
            name,
            url,
            server_url,
        }
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A URL for this database (the server's URL with its database name).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A new connection to this database.
    pub fn client(&self) -> postgres::Client {
        connect(&self.url)
    }
}

impl Default for TestDb {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Ok(mut client) = postgres::Client::connect(&self.server_url, postgres::NoTls) else {
            eprintln!("testkit: could not connect to drop database {}", self.name);
            return;
        };
        let name = &self.name;
        // WITH (FORCE) needs PostgreSQL 13; older servers: end the sessions, then drop.
        let forced =
            client.batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"));
        if forced.is_err() {
            let _ = client.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                &[name],
            );
            if let Err(e) = client.batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\"")) {
                eprintln!("testkit: could not drop database {name}: {e}");
            }
        }
    }
}

/// `url` with its database name replaced by `name`.
pub(crate) fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    let authority_end = base[after_scheme..]
        .find('/')
        .map_or(base.len(), |i| after_scheme + i);
    let mut out = format!("{}/{name}", &base[..authority_end]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

/// The parts of a `postgres://user:password@host:port/dbname?param=value` URL, percent-decoded.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PgUrl {
    pub user: Option<String>,
    pub password: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub dbname: Option<String>,
    pub params: Vec<(String, String)>,
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = s.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_url(url: &str) -> PgUrl {
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
        .unwrap_or_else(|| panic!("not a postgres:// URL: {url}"));
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let mut parsed = PgUrl::default();
    if let Some(userinfo) = userinfo {
        let (user, password) = match userinfo.split_once(':') {
            Some((u, p)) => (u, Some(p)),
            None => (userinfo, None),
        };
        parsed.user = Some(percent_decode(user)).filter(|u| !u.is_empty());
        parsed.password = password.map(percent_decode);
    }
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, after) = v6.split_once(']').unwrap_or((v6, ""));
        (h, after.strip_prefix(':'))
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    parsed.host = Some(percent_decode(host)).filter(|h| !h.is_empty());
    parsed.port = port.and_then(|p| p.parse().ok());
    parsed.dbname = Some(percent_decode(path)).filter(|d| !d.is_empty());
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        parsed.params.push((percent_decode(k), percent_decode(v)));
    }
    parsed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "t1"),
            "postgres://postgres@127.0.0.1:5432/t1"
        );
        assert_eq!(
            with_database("postgresql://u:p@h/db?sslmode=disable", "t1"),
            "postgresql://u:p@h/t1?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h:1", "t"), "postgres://h:1/t");

        let p = parse_url("postgres://us%40er:p%3Ass@127.0.0.1:5433/my_db?host=/run/pg&x=1");
        assert_eq!(p.user.as_deref(), Some("us@er"));
        assert_eq!(p.password.as_deref(), Some("p:ss"));
        assert_eq!(p.host.as_deref(), Some("127.0.0.1"));
        assert_eq!(p.port, Some(5433));
        assert_eq!(p.dbname.as_deref(), Some("my_db"));
        assert_eq!(
            p.params,
            [
                ("host".to_owned(), "/run/pg".to_owned()),
                ("x".to_owned(), "1".to_owned())
            ]
        );
        let p = parse_url("postgresql://[::1]:6000/d");
        assert_eq!((p.host.as_deref(), p.port), (Some("::1"), Some(6000)));
        assert_eq!(p.user, None);
    }
}
