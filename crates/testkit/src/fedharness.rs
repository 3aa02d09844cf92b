//! Two federating homeservers on loopback, each a real Synapse behind its own nginx TLS listener,
//! optionally with its media routed to a media repo under test.
//!
//! Synapse federates over TLS only and finds a peer from its server name, so each homeserver is
//! named `localhost:<port>` and nginx listens on exactly that port with a certificate from a test
//! CA both Synapses trust. Clients use that port too, so a test talks to the same front a peer
//! does, and nginx's access log shows every request that reached a homeserver.

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::json;

use crate::caddy::Caddy;
use crate::nginx::Nginx;
use crate::synapse::{Synapse, free_port};
use crate::tls::TestCerts;

/// How one homeserver of a [`Federation`] is set up; the default is a stock Synapse serving its
/// own media.
#[derive(Clone, Default)]
pub struct HomeserverSetup {
    media_upstream: Option<u16>,
    extra_signing_key: Option<String>,
    webserver: Option<Arc<WebserverFn>>,
}

/// What a test configures the webserver in front of a homeserver with.
pub enum Webserver {
    /// Lines for nginx's `http {}` block (testkit adds the rest).
    Nginx(String),
    /// Caddyfile site blocks (testkit adds the global options).
    Caddy(String),
}

/// Where a homeserver's webserver listens and what is behind it, for a test to write its config.
#[derive(Debug, Clone)]
pub struct Front {
    /// The federation port: the port of the server name `localhost:<port>`.
    pub federation_port: u16,
    /// The client port, which clients (and `public_baseurl`) use.
    pub client_port: u16,
    /// Synapse's plain HTTP listener on 127.0.0.1 (client and federation resources).
    pub synapse_port: u16,
    pub certificate: PathBuf,
    pub certificate_key: PathBuf,
}

type WebserverFn = dyn Fn(&Front) -> Webserver + Send + Sync;

impl HomeserverSetup {
    /// Routes `/_matrix/media/`, `/_matrix/client/v1/media/` and `/_matrix/federation/v1/media/`
    /// to `http://127.0.0.1:<port>` (the media repo under test, which the test starts there after
    /// the harness, typically on a [`free_port`]) and turns Synapse's own media repo off, so a
    /// request routed to Synapse by mistake fails loudly (404 `M_UNRECOGNIZED`).
    pub fn media_upstream(mut self, port: u16) -> Self {
        self.media_upstream = Some(port);
        self
    }

    /// Appends a signing key line in Synapse's format (`ed25519 <version> <unpadded base64
    /// seed>`) after the homeserver's own generated key: the media repo's key merged into its
    /// homeserver's key file, so peers fetching the homeserver's keys also get the repo's. The
    /// homeserver's key stays first because Synapse signs with the first.
    pub fn extra_signing_key(mut self, line: &str) -> Self {
        self.extra_signing_key = Some(line.to_owned());
        self
    }

    /// Fronts the homeserver with the webserver `config` describes instead of testkit's nginx,
    /// on two ports (federation and client, see [`Front`]), and turns Synapse's own media repo
    /// off: the test's config decides what reaches whom.
    pub fn webserver(
        mut self,
        config: impl Fn(&Front) -> Webserver + Send + Sync + 'static,
    ) -> Self {
        self.webserver = Some(Arc::new(config));
        self
    }
}

/// How to start a [`Federation`]; [`FederationBuilder::start`] starts it.
#[derive(Clone, Default)]
pub struct FederationBuilder {
    a: HomeserverSetup,
    b: HomeserverSetup,
}

impl FederationBuilder {
    /// How homeserver A is set up.
    pub fn a(mut self, setup: HomeserverSetup) -> Self {
        self.a = setup;
        self
    }

    /// How homeserver B is set up.
    pub fn b(mut self, setup: HomeserverSetup) -> Self {
        self.b = setup;
        self
    }

    /// Makes the certificates, starts both Synapses (concurrently) and both nginx, and returns
    /// once all four answer: a federation request made earlier would be refused and start
    /// Synapse's backoff toward that peer.
    pub fn start(self) -> Federation {
        let certs = TestCerts::new();
        let a_port = free_port();
        let b_port = std::iter::repeat_with(free_port)
            .find(|&p| p != a_port)
            .unwrap_or_default();
        let ports = [a_port, b_port];
        let client_port = |setup: &HomeserverSetup, port: u16| {
            if setup.webserver.is_some() {
                std::iter::repeat_with(free_port)
                    .find(|p| !ports.contains(p))
                    .unwrap_or_default()
            } else {
                port
            }
        };
        let client_ports = [client_port(&self.a, a_port), client_port(&self.b, b_port)];
        let synapse = |setup: &HomeserverSetup, port: u16, client_port: u16| {
            let mut builder = Synapse::builder(&format!("localhost:{port}"))
                .x_forwarded(true)
                .config(
                    "public_baseurl",
                    json!(format!("https://localhost:{client_port}/")),
                )
                .config("federation_verify_certificates", json!(true))
                .config(
                    "federation_custom_ca_list",
                    json!([certs.ca_path().to_string_lossy()]),
                )
                .config("ip_range_whitelist", json!(["127.0.0.0/8", "::1/128"]))
                .config("max_upload_size", json!("200M"))
                // By default a failed request backs off the peer for 10 min, doubling each time.
                // 1 ms is the shortest that works: at 0 a later success never clears the failure.
                .config(
                    "federation",
                    json!({
                        "destination_min_retry_interval": 1,
                        "destination_max_retry_interval": "1s",
                    }),
                )
                // Remote media is rate-limited apart from rc_* (87 KiB/s after 500 MiB).
                .config("remote_media_download_burst_count", json!("100G"))
                .config("remote_media_download_per_second", json!("100G"));
            if setup.media_upstream.is_some() || setup.webserver.is_some() {
                builder = builder.config("enable_media_repo", json!(false));
            }
            if setup.webserver.is_some() {
                // Clients find the client port from the server name, as in production.
                builder = builder.config("serve_client_wellknown", json!(true));
            }
            if let Some(line) = &setup.extra_signing_key {
                builder = builder.append_signing_key(line);
            }
            builder
        };
        let (a, b) = (
            synapse(&self.a, ports[0], client_ports[0]),
            synapse(&self.b, ports[1], client_ports[1]),
        );
        // Each takes a few seconds, mostly Python starting up.
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| a.start());
            let b = s.spawn(|| b.start());
            let (a, b) = (a.join(), b.join());
            match (a, b) {
                (Ok(a), Ok(b)) => (a, b),
                (Err(panic), _) | (_, Err(panic)) => std::panic::resume_unwind(panic),
            }
        });
        let front = |setup: &HomeserverSetup, synapse: Synapse, port: u16, client_port: u16| {
            let webserver = match &setup.webserver {
                Some(config) => {
                    let front = Front {
                        federation_port: port,
                        client_port,
                        synapse_port: synapse.port(),
                        certificate: certs.cert_path(),
                        certificate_key: certs.key_path(),
                    };
                    match config(&front) {
                        Webserver::Nginx(http) => {
                            FrontProcess::Nginx(Nginx::start(&http, &[port, client_port]))
                        }
                        Webserver::Caddy(sites) => {
                            FrontProcess::Caddy(Caddy::start(&sites, &[port, client_port]))
                        }
                    }
                }
                None => FrontProcess::Nginx(Nginx::start(
                    &server_block(port, synapse.port(), setup.media_upstream, &certs),
                    &[port],
                )),
            };
            Homeserver {
                webserver,
                synapse,
                port,
                client_port,
            }
        };
        let a = front(&self.a, a, ports[0], client_ports[0]);
        let b = front(&self.b, b, ports[1], client_ports[1]);
        Federation { a, b, certs }
    }
}

/// nginx's `server` block for one homeserver: TLS on `port`, media to `media` when given, the
/// rest to Synapse on `synapse`.
fn server_block(port: u16, synapse: u16, media: Option<u16>, certs: &TestCerts) -> String {
    // proxy_pass with no URI part passes the request target exactly as received, which X-Matrix
    // signatures cover; `Host $http_host` keeps the port, which is part of the server name.
    let media_locations = media
        .map(|media| {
            [
                "/_matrix/media/",
                "/_matrix/client/v1/media/",
                "/_matrix/federation/v1/media/",
            ]
            .iter()
            .map(|prefix| {
                format!(
                    "        location {prefix} {{ proxy_pass http://127.0.0.1:{media}; \
                     proxy_buffering off; }}\n"
                )
            })
            .collect::<String>()
        })
        .unwrap_or_default();
    format!(
        r#"    server {{
        listen 127.0.0.1:{port} ssl;
        server_name localhost;
        ssl_certificate "{cert}";
        ssl_certificate_key "{key}";
        client_max_body_size 200m;
        proxy_http_version 1.1;
        proxy_set_header Host $http_host;
        proxy_set_header X-Forwarded-Host $http_host;
        proxy_set_header X-Forwarded-For $remote_addr;
        proxy_set_header X-Forwarded-Proto $scheme;
{media_locations}        location / {{ proxy_pass http://127.0.0.1:{synapse}; }}
    }}
"#,
        cert = certs.cert_path().display(),
        key = certs.key_path().display(),
    )
}

/// Two homeservers, A and B, that federate with each other over TLS on loopback (see the module
/// docs). Everything is stopped and removed when dropped.
pub struct Federation {
    a: Homeserver,
    b: Homeserver,
    certs: TestCerts,
}

impl Federation {
    /// A builder; both homeservers are stock unless set up otherwise.
    pub fn builder() -> FederationBuilder {
        FederationBuilder::default()
    }

    /// Two stock homeservers.
    pub fn start() -> Self {
        Self::builder().start()
    }

    pub fn a(&self) -> &Homeserver {
        &self.a
    }

    pub fn b(&self) -> &Homeserver {
        &self.b
    }

    /// The test CA's certificate (PEM), which both Synapses trust: a media repo's outbound
    /// client must trust it too.
    pub fn ca_path(&self) -> PathBuf {
        self.certs.ca_path()
    }

    /// The certificates, and an HTTPS client that trusts the CA ([`TestCerts::get`],
    /// [`TestCerts::send`]).
    pub fn certs(&self) -> &TestCerts {
        &self.certs
    }
}

/// One homeserver of a [`Federation`]: a Synapse and the webserver in front of it.
pub struct Homeserver {
    webserver: FrontProcess,
    synapse: Synapse,
    port: u16,
    client_port: u16,
}

enum FrontProcess {
    Nginx(Nginx),
    Caddy(Caddy),
}

impl Homeserver {
    /// `localhost:<port>`: the port is nginx's, where peers and clients connect.
    pub fn server_name(&self) -> &str {
        self.synapse.server_name()
    }

    /// nginx's TLS port on 127.0.0.1, the port of the server name.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `https://localhost:<port>`: the homeserver as clients reach it (through its webserver; the
    /// federation port too unless the test's webserver has a client port of its own).
    pub fn base_url(&self) -> String {
        format!("https://localhost:{}", self.client_port)
    }

    /// The client port (the federation port unless the test's webserver has its own).
    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    /// `http://127.0.0.1:<port>`: Synapse's own listener, bypassing nginx (and the media
    /// upstream).
    pub fn client_url(&self) -> String {
        self.synapse.base_url()
    }

    /// nginx's access log so far: `<client> "<request line>" <status> <bytes> "<Host>"`, one
    /// request a line, with the request target as received. A line is written once the request
    /// is answered, which can be just after the requester got the response.
    ///
    /// Panics for a Caddy front, whose config is the test's (and has no access log).
    pub fn access_log(&self) -> Vec<String> {
        match &self.webserver {
            FrontProcess::Nginx(nginx) => nginx.access_log(),
            FrontProcess::Caddy(_) => panic!("a Caddy front keeps no access log"),
        }
    }

    /// Reloads an nginx front with `http` (see [`Nginx::reload`]).
    ///
    /// Panics for a Caddy front.
    pub fn reload_nginx(&self, http: &str) {
        match &self.webserver {
            FrontProcess::Nginx(nginx) => nginx.reload(http),
            FrontProcess::Caddy(_) => panic!("only an nginx front reloads here"),
        }
    }

    /// What the webserver logged: nginx's error log, or Caddy's log.
    pub fn webserver_log(&self) -> String {
        match &self.webserver {
            FrontProcess::Nginx(nginx) => nginx.error_log(),
            FrontProcess::Caddy(caddy) => caddy.log(),
        }
    }

    /// Registers a user through Synapse's shared-secret API; returns the user id and an access
    /// token.
    pub fn register_user(&self, name: &str, admin: bool) -> (String, String) {
        self.synapse.register_user(name, admin)
    }

    /// The signing key file Synapse reads: its own key first, then the extra key, if any.
    pub fn signing_key_path(&self) -> PathBuf {
        self.synapse.signing_key_path()
    }

    /// The Synapse, for its config, log and directory.
    pub fn synapse(&self) -> &Synapse {
        &self.synapse
    }
}
