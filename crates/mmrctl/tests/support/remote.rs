//! A scripted remote homeserver for federation tests: TLS by a real nginx (test CA), behind it a
//! small HTTP server whose answers the test sets per path, down to faults Synapse cannot make
//! (a body that stops halfway, no answer at all). It publishes a signing key, so it can also
//! sign requests to us, and records every request it gets.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keys::SigningKey;
use serde_json::{Value, json};
use testkit::{Nginx, TestCerts};

/// What the remote does for a path.
#[derive(Clone)]
pub enum Action {
    /// A complete response.
    Respond {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// These raw bytes (status line, headers and part of a body), then silence.
    Stall(Vec<u8>),
    /// Reads the request and never answers.
    Hang,
    /// Waits, then does the other action (so that concurrent requests overlap).
    After(Duration, Box<Action>),
    /// A `200` with these headers and a body that never ends (until the client closes).
    Endless(Vec<(String, String)>),
}

impl Action {
    pub fn json(status: u16, body: Value) -> Action {
        Action::Respond {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: serde_json::to_vec(&body).unwrap(),
        }
    }

    /// A federation download answer as Synapse writes it (built here by hand, independently of
    /// the server's own writer).
    pub fn multipart(content_type: &str, disposition: Option<&str>, file: &[u8]) -> Action {
        let (content_type_header, body) = multipart_body(content_type, disposition, file);
        Action::Respond {
            status: 200,
            headers: vec![("Content-Type".into(), content_type_header)],
            body,
        }
    }

    /// A multipart answer whose part 2 is only `Location: location`.
    /// A `302` to `location`.
    pub fn redirect(location: &str) -> Action {
        Action::Respond {
            status: 302,
            headers: vec![("Location".into(), location.into())],
            body: Vec::new(),
        }
    }

    /// A `200` of `content_type`.
    pub fn ok(content_type: &str, body: impl Into<Vec<u8>>) -> Action {
        Action::Respond {
            status: 200,
            headers: vec![("Content-Type".into(), content_type.into())],
            body: body.into(),
        }
    }

    pub fn location(location: &str) -> Action {
        let b = "6d6d7263746c74657374";
        let body = format!(
            "\r\n--{b}\r\nContent-Type: application/json\r\n\r\n{{}}\r\n--{b}\r\nLocation: {location}\r\n\r\n\r\n--{b}--\r\n"
        );
        Action::Respond {
            status: 200,
            headers: vec![(
                "Content-Type".into(),
                format!("multipart/mixed; boundary={b}"),
            )],
            body: body.into_bytes(),
        }
    }

    pub fn file(content_type: &str, disposition: Option<&str>, file: &[u8]) -> Action {
        let mut headers = vec![("Content-Type".into(), content_type.to_owned())];
        if let Some(d) = disposition {
            headers.push(("Content-Disposition".into(), d.to_owned()));
        }
        Action::Respond {
            status: 200,
            headers,
            body: file.to_vec(),
        }
    }
}

pub fn multipart_body(
    content_type: &str,
    disposition: Option<&str>,
    file: &[u8],
) -> (String, Vec<u8>) {
    let b = "0123456789abcdef0123456789abcdef";
    let mut body = format!(
        "\r\n--{b}\r\nContent-Type: application/json\r\n\r\n{{}}\r\n--{b}\r\nContent-Type: {content_type}\r\n"
    );
    if let Some(d) = disposition {
        body.push_str(&format!("Content-Disposition: {d}\r\n"));
    }
    body.push_str("\r\n");
    let mut bytes = body.into_bytes();
    bytes.extend_from_slice(file);
    bytes.extend_from_slice(format!("\r\n--{b}--\r\n").as_bytes());
    (format!("multipart/mixed; boundary={b}"), bytes)
}

/// A request the remote received.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Path and query, as received.
    pub target: String,
    pub host: String,
    pub authorization: Vec<String>,
    pub accept_language: Option<String>,
    pub user_agent: Option<String>,
}

impl Seen {
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
}

type Routes = Arc<Mutex<HashMap<String, Action>>>;

/// A plain HTTP server on loopback whose answers the test sets per path; it records every
/// request and counts connections.
#[derive(Clone)]
pub struct Scripted {
    pub port: u16,
    routes: Routes,
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<std::sync::atomic::AtomicUsize>,
}

impl Scripted {
    /// Listens at `ip`, on a free port.
    pub fn start(ip: &str) -> Scripted {
        let listener = TcpListener::bind((ip, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let scripted = Scripted {
            port,
            routes: Arc::default(),
            seen: Arc::default(),
            connections: Arc::default(),
        };
        let server = scripted.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                server
                    .connections
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let (routes, seen) = (server.routes.clone(), server.seen.clone());
                std::thread::spawn(move || serve(stream, &routes, &seen));
            }
        });
        scripted
    }

    /// What `path` (no query) answers from now on.
    pub fn route(&self, path: &str, action: Action) {
        self.routes.lock().unwrap().insert(path.to_owned(), action);
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Requests whose path starts with `prefix`.
    pub fn count(&self, prefix: &str) -> usize {
        self.seen()
            .iter()
            .filter(|s| s.path().starts_with(prefix))
            .count()
    }

    /// Connections accepted, whether or not a request followed.
    pub fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }
}

pub struct FakeRemote {
    /// Its server name: `localhost:<TLS port>`.
    pub name: String,
    pub port: u16,
    pub key: SigningKey,
    pub certs: TestCerts,
    backend: Scripted,
    _nginx: Nginx,
}

impl FakeRemote {
    pub fn start() -> FakeRemote {
        FakeRemote::start_with_names(&[])
    }

    /// A remote whose certificate is also valid for `dns_names` (delegation tests).
    pub fn start_with_names(dns_names: &[&str]) -> FakeRemote {
        let backend = Scripted::start("127.0.0.1");
        let backend_port = backend.port;
        let port = super::free_port();
        let name = format!("localhost:{port}");
        let key = SigningKey::generate().unwrap();
        let certs = TestCerts::with_dns_names(dns_names);
        let keys_answer = {
            let mut v = json!({
                "server_name": name,
                "verify_keys": { key.id().to_string(): { "key": key.public_key_base64() } },
                "old_verify_keys": {},
                "valid_until_ts": testkit_now_ms() + 24 * 3600 * 1000,
            });
            keys::sign_json(&mut v, &name, &key).unwrap();
            v
        };
        backend.route("/_matrix/key/v2/server", Action::json(200, keys_answer));
        let nginx = Nginx::start(
            &format!(
                r#"server {{
  listen 127.0.0.1:{port} ssl;
  server_name localhost;
  ssl_certificate "{cert}";
  ssl_certificate_key "{key}";
  location / {{
    proxy_pass http://127.0.0.1:{backend_port};
    proxy_http_version 1.1;
    proxy_set_header Host $http_host;
    proxy_buffering off;
    proxy_read_timeout 600s;
  }}
}}"#,
                cert = certs.cert_path().display(),
                key = certs.key_path().display(),
            ),
            &[port],
        );
        FakeRemote {
            name,
            port,
            key,
            certs,
            backend,
            _nginx: nginx,
        }
    }

    /// What `path` (no query) answers from now on.
    pub fn route(&self, path: &str, action: Action) {
        self.backend.route(path, action);
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.backend.seen()
    }

    /// Requests whose path starts with `prefix`.
    pub fn count(&self, prefix: &str) -> usize {
        self.backend.count(prefix)
    }

    pub fn federation_path(media_id: &str) -> String {
        format!("/_matrix/federation/v1/media/download/{media_id}")
    }

    pub fn legacy_path(&self, media_id: &str) -> String {
        format!("/_matrix/media/v3/download/{}/{media_id}", self.name)
    }

    /// An `Authorization` header for `GET uri` from this server to `destination`.
    pub fn sign(&self, destination: &str, uri: &str) -> String {
        keys::sign_request(&self.key, &self.name, destination, "GET", uri, None).unwrap()
    }
}

fn testkit_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn serve(stream: TcpStream, routes: &Routes, seen: &Mutex<Vec<Seen>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let target = line.split_whitespace().nth(1).unwrap_or("").to_owned();
    let (mut host, mut authorization) = (String::new(), Vec::new());
    let (mut accept_language, mut user_agent) = (None, None);
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).unwrap_or(0) == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.trim_end().split_once(':') {
            match name.to_ascii_lowercase().as_str() {
                "host" => host = value.trim().to_owned(),
                "authorization" => authorization.push(value.trim().to_owned()),
                "accept-language" => accept_language = Some(value.trim().to_owned()),
                "user-agent" => user_agent = Some(value.trim().to_owned()),
                _ => {}
            }
        }
    }
    let path = target.split('?').next().unwrap_or("").to_owned();
    seen.lock().unwrap().push(Seen {
        target,
        host,
        authorization,
        accept_language,
        user_agent,
    });
    let action = routes
        .lock()
        .unwrap()
        .get(&path)
        .cloned()
        .unwrap_or_else(|| {
            Action::json(
                404,
                json!({"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"}),
            )
        });
    let mut stream = stream;
    let mut action = action;
    while let Action::After(pause, then) = action {
        std::thread::sleep(pause);
        action = *then;
    }
    match action {
        Action::Respond {
            status,
            headers,
            body,
        } => {
            let mut head = format!(
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n",
                body.len()
            );
            for (k, v) in headers {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            head.push_str("\r\n");
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
        }
        Action::Stall(bytes) => {
            let _ = stream.write_all(&bytes);
            let _ = stream.flush();
            std::thread::sleep(Duration::from_secs(120));
        }
        Action::Hang => std::thread::sleep(Duration::from_secs(120)),
        Action::Endless(headers) => {
            let mut head = "HTTP/1.1 200 OK\r\nConnection: close\r\n".to_owned();
            for (k, v) in headers {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            head.push_str("\r\n");
            let filler = b"<p>and more</p>\n".repeat(4096);
            if stream.write_all(head.as_bytes()).is_ok() {
                while stream.write_all(&filler).is_ok() {}
            }
        }
        Action::After(..) => unreachable!("unwrapped above"),
    }
}
