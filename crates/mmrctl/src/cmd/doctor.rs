//! `mmrctl doctor`: checks a running deployment from the outside in, as clients and other servers
//! reach it, and says what is wrong and how to fix it.
//!
//! For each homeserver: its client and federation hosts send media paths to the media repo (whose
//! responses carry `X-Mmrctl-Instance`) and everything else to the homeserver; the homeserver's own
//! media repo is off; it publishes the media repo's key, and accepts a request signed with it.
//! Then the database and every datastore (a probe object written, read back and deleted), the
//! space left, and the clocks.

use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use outbound::{Method, Purpose, header};
use serde::Serialize;

const USER_AGENT: &str = concat!("mmrctl-doctor/", env!("CARGO_PKG_VERSION"));
const MARKER: &str = server::INSTANCE_HEADER;
/// Clocks further apart than this break signatures and key validity sooner or later.
const SKEW_WARN: Duration = Duration::from_secs(30);
const SKEW_FAIL: Duration = Duration::from_secs(300);

#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    config: crate::ConfigArg,
    /// Print the findings as JSON (`{"ok": bool, "checks": [...]}`) for monitoring.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    Ok,
    Warning,
    Failed,
}

#[derive(Debug, Serialize)]
struct Finding {
    check: &'static str,
    /// What was checked: a homeserver, a datastore, the database.
    subject: String,
    status: Status,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    fix: Option<String>,
}

#[derive(Default)]
struct Findings(Vec<Finding>);

impl Findings {
    fn ok(&mut self, check: &'static str, subject: &str, message: impl Into<String>) {
        self.push(check, subject, Status::Ok, message.into(), None);
    }

    fn warn(&mut self, check: &'static str, subject: &str, message: String, fix: String) {
        self.push(check, subject, Status::Warning, message, Some(fix));
    }

    fn fail(&mut self, check: &'static str, subject: &str, message: String, fix: String) {
        self.push(check, subject, Status::Failed, message, Some(fix));
    }

    fn push(
        &mut self,
        check: &'static str,
        subject: &str,
        status: Status,
        message: String,
        fix: Option<String>,
    ) {
        self.0.push(Finding {
            check,
            subject: subject.to_owned(),
            status,
            message,
            fix,
        });
    }
}

pub(crate) fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let loaded = config::Config::load_valid(&args.config.config)?;
    let findings = crate::runtime()?.block_on(doctor(&loaded.config))?;
    let ok = findings.0.iter().all(|f| f.status != Status::Failed);
    if args.json {
        let report = serde_json::json!({ "ok": ok, "checks": findings.0 });
        crate::emit(&format!("{report:#}\n"));
    } else {
        let mut text = String::new();
        for f in &findings.0 {
            let status = match f.status {
                Status::Ok => "ok",
                Status::Warning => "WARNING",
                Status::Failed => "FAILED",
            };
            text.push_str(&format!(
                "{status:<8} {:<22} {}: {}\n",
                f.check, f.subject, f.message
            ));
            if let Some(fix) = &f.fix {
                text.push_str(&format!("{:31} fix: {fix}\n", ""));
            }
        }
        let failed = findings
            .0
            .iter()
            .filter(|f| f.status == Status::Failed)
            .count();
        let warned = findings
            .0
            .iter()
            .filter(|f| f.status == Status::Warning)
            .count();
        text.push_str(&format!(
            "{} checks: {failed} failed, {warned} warnings\n",
            findings.0.len()
        ));
        crate::emit(&text);
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn doctor(config: &config::Config) -> anyhow::Result<Findings> {
    let mut findings = Findings::default();
    // No address filter: these are the operator's own servers, wherever they are. Names are
    // resolved as the server resolves them (`federation.nameservers`, else the system's).
    let dns = if config.federation.nameservers.is_empty() {
        outbound::Resolver::system().context("DNS (/etc/resolv.conf)")?
    } else {
        let servers = outbound::parse_nameservers(&config.federation.nameservers)
            .map_err(|e| anyhow::anyhow!("federation.nameservers: {e}"))?;
        outbound::Resolver::nameservers(&servers).context("federation.nameservers")?
    };
    let http = outbound::Client::builder(USER_AGENT)
        .resolver(dns)
        .build()
        .context("the HTTP client")?;
    let discovery = federation::discovery::Discovery::new(http.clone())
        .map_err(|e| anyhow::anyhow!("server discovery: {e}"))?;
    let fed = federation::Client::new(http.clone(), discovery)
        .map_err(|e| anyhow::anyhow!("the federation client: {e}"))?;
    let signers = match media::load_signers(config) {
        Ok(signers) => signers,
        Err(e) => {
            findings.fail(
                "signing key",
                "homeservers",
                e,
                "generate the key with `mmrctl keys generate` and point signingKeyPath at it"
                    .into(),
            );
            Default::default()
        }
    };
    for hs in &config.homeservers {
        let client_base = client_base_url(&http, &hs.name).await;
        check_client_routes(&mut findings, &http, &hs.name, &client_base).await;
        check_homeserver_media_off(&mut findings, &http, hs).await;
        let signer = signers.get(&hs.name);
        check_federation(&mut findings, &http, &fed, &hs.name, signer).await;
    }
    check_database(&mut findings, config).await;
    check_datastores(&mut findings, config).await;
    Ok(findings)
}

fn timeout() -> Purpose {
    Purpose::homeserver(Duration::from_secs(15))
}

/// The client-server base URL clients find for `name`: `.well-known/matrix/client`, else
/// `https://<name>`.
async fn client_base_url(http: &outbound::Client, name: &str) -> String {
    let fallback = format!("https://{name}");
    let url = format!("{fallback}/.well-known/matrix/client");
    let Ok(response) = http.send(Method::GET, &url, timeout(), |r| r).await else {
        return fallback;
    };
    if !response.status().is_success() {
        return fallback;
    }
    response
        .json()
        .await
        .ok()
        .and_then(|v| v["m.homeserver"]["base_url"].as_str().map(str::to_owned))
        .map_or(fallback, |b| b.trim_end_matches('/').to_owned())
}

/// Whether a `GET` of `url` was answered by the media repo (`None`: no answer at all).
async fn reaches_repo(
    http: &outbound::Client,
    url: &str,
    host: Option<&str>,
) -> Result<(bool, outbound::Response), String> {
    let response = http
        .send(Method::GET, url, timeout(), |r| match host {
            Some(host) => r.header(header::HOST, host),
            None => r,
        })
        .await
        .map_err(|e| e.to_string())?;
    Ok((response.headers().contains_key(MARKER), response))
}

/// Paths that must reach the media repo, and paths that must not.
struct Routes<'a> {
    check: &'static str,
    media: &'a [&'a str],
    other: &'a [&'a str],
}

/// Media paths to the media repo, the rest to the homeserver, on `base` (`host` overrides the
/// `Host` header, as federation sends it).
async fn check_routes(
    findings: &mut Findings,
    http: &outbound::Client,
    routes: Routes<'_>,
    subject: &str,
    base: &str,
    host: Option<&str>,
) {
    let Routes {
        check,
        media: media_paths,
        other: other_paths,
    } = routes;
    let where_ = if host.is_some() {
        "federation"
    } else {
        "client"
    };
    let mut wrong = Vec::new();
    for (path, want_repo) in media_paths
        .iter()
        .map(|p| (p, true))
        .chain(other_paths.iter().map(|p| (p, false)))
    {
        let url = format!("{base}{path}");
        match reaches_repo(http, &url, host).await {
            Ok((is_repo, _)) if is_repo == want_repo => {}
            // The webserver's own error: the media repo (or the homeserver) did not answer it.
            Ok((false, r)) if want_repo && matches!(r.status().as_u16(), 502..=504) => {
                wrong.push(format!(
                    "{path}: the webserver got no answer from the media repo ({}); is `mmrctl \
                     serve` running where the webserver sends media?",
                    r.status()
                ))
            }
            Ok((is_repo, r)) => wrong.push(format!(
                "{path} reached the {} ({})",
                if is_repo { "media repo" } else { "homeserver" },
                r.status()
            )),
            Err(e) => {
                findings.fail(
                    check,
                    subject,
                    format!("{url}: {e}"),
                    format!("make {base} reachable ({where_} API of {subject})"),
                );
                return;
            }
        }
    }
    if wrong.is_empty() {
        findings.ok(
            check,
            subject,
            format!("{base}: media paths reach the media repo, the rest the homeserver"),
        );
    } else {
        findings.fail(
            check,
            subject,
            format!("{base}: {}", wrong.join("; ")),
            "route the media paths, and only those, to the media repo: include the nginx or Caddy \
             file `mmrctl render` wrote (nginx/, caddy/) or use its Traefik routes"
                .into(),
        );
    }
}

async fn check_client_routes(
    findings: &mut Findings,
    http: &outbound::Client,
    name: &str,
    base: &str,
) {
    let routes = Routes {
        check: "client routing",
        media: &[
            "/_matrix/client/v1/media/config",
            "/_matrix/media/v3/config",
        ],
        other: &["/_matrix/client/versions"],
    };
    check_routes(findings, http, routes, name, base, None).await;
}

/// The homeserver's own media repo answers media requests on its client API when it is on.
async fn check_homeserver_media_off(
    findings: &mut Findings,
    http: &outbound::Client,
    hs: &config::Homeserver,
) {
    let url = format!(
        "{}/_matrix/client/v1/media/config",
        hs.cs_api.trim_end_matches('/')
    );
    let check = "homeserver media off";
    match reaches_repo(http, &url, None).await {
        Err(e) => findings.fail(
            check,
            &hs.name,
            format!("{url}: {e}"),
            "check csApi: the media repo reaches the homeserver there".into(),
        ),
        Ok((true, _)) => findings.warn(
            check,
            &hs.name,
            format!("csApi ({}) is the media repo itself", hs.cs_api),
            "point csApi at the homeserver's client API, not at a proxy that sends media here"
                .into(),
        ),
        Ok((false, r)) if r.status().as_u16() == 404 => findings.ok(
            check,
            &hs.name,
            "the homeserver does not serve media itself",
        ),
        // Its media API answering (asking for a token, or with the limits) means it is on.
        Ok((false, r)) if !matches!(r.status().as_u16(), 200 | 401 | 403) => findings.warn(
            check,
            &hs.name,
            format!("cannot tell: {url} answered {}", r.status()),
            "check that the homeserver runs and that csApi points at it".into(),
        ),
        Ok((false, _)) if hs.admin_api_kind == config::AdminApiKind::Dendrite => findings.warn(
            check,
            &hs.name,
            "Dendrite's media API cannot be switched off: only the routing keeps media away \
             from it"
                .into(),
            "keep every media path routed to the media repo (see client and federation \
             routing)"
                .into(),
        ),
        Ok((false, r)) => findings.fail(
            check,
            &hs.name,
            format!(
                "the homeserver's own media repository is on: {url} answered {}",
                r.status()
            ),
            "turn it off (Synapse: `enable_media_repo: false`; homeserver-snippet.yaml from \
             `mmrctl render` has the settings) and restart the homeserver, or two stores diverge"
                .into(),
        ),
    }
}

async fn check_federation(
    findings: &mut Findings,
    http: &outbound::Client,
    fed: &federation::Client,
    name: &str,
    signer: Option<&federation::Signer>,
) {
    let dest = match fed.resolve(name).await {
        Ok(dest) => dest,
        Err(e) => {
            findings.fail(
                "federation routing",
                name,
                e.to_string(),
                "publish /.well-known/matrix/server or an SRV record, or listen on 8448".into(),
            );
            return;
        }
    };
    let routes = Routes {
        check: "federation routing",
        media: &["/_matrix/federation/v1/media/download/mmrctl-doctor-probe"],
        other: &["/_matrix/key/v2/server", "/_matrix/federation/v1/version"],
    };
    check_routes(
        findings,
        http,
        routes,
        name,
        &dest.base_url,
        Some(&dest.host_header),
    )
    .await;

    // The keys other servers verify our signatures with.
    let url = format!("{}/_matrix/key/v2/server", dest.base_url);
    let keys = http
        .send(Method::GET, &url, timeout(), |r| {
            r.header(header::HOST, dest.host_header.as_str())
        })
        .await;
    let response = match keys {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => {
            let status = r.status();
            findings.fail(
                "key published",
                name,
                format!("{url} answered {status}"),
                "the homeserver must serve /_matrix/key/v2/server on its federation host".into(),
            );
            return;
        }
        Err(e) => {
            findings.fail("key published", name, format!("{url}: {e}"), "".into());
            return;
        }
    };
    check_skew(findings, name, "the homeserver", response.headers());
    let published = response.json().await.unwrap_or_default();
    let Some(signer) = signer else {
        findings.warn(
            "key published",
            name,
            "no signingKeyPath: requests to other servers are not signed, so authenticated \
             remote media fails"
                .into(),
            "generate a key (`mmrctl keys generate`), merge it into the homeserver's key file \
             (`mmrctl keys merge`) and set signingKeyPath"
                .into(),
        );
        return;
    };
    let id = signer.key.id().to_string();
    let key = published["verify_keys"][&id]["key"].as_str();
    match key {
        Some(k) if k == signer.key.public_key_base64() => findings.ok(
            "key published",
            name,
            format!("the homeserver publishes {id}"),
        ),
        Some(_) => findings.fail(
            "key published",
            name,
            format!("the homeserver publishes a different key as {id}"),
            "merge the media repo's current key into the homeserver's key file \
             (`mmrctl keys merge`) and restart the homeserver"
                .into(),
        ),
        None => findings.fail(
            "key published",
            name,
            format!(
                "the homeserver does not publish the media repo's key {id}: other servers \
                 reject its requests"
            ),
            "merge it into the homeserver's key file (`mmrctl keys merge`) and restart the \
             homeserver"
                .into(),
        ),
    }

    // A request signed as the media repo signs them, verified by the homeserver itself.
    let probe = format!(
        "/_matrix/federation/v1/query/profile?user_id=%40mmrctl-doctor%3A{}&field=displayname",
        name.replace(':', "%3A")
    );
    match fed.get(name, &probe, Some(signer), timeout()).await {
        Ok((_, r)) if r.status().as_u16() == 401 => {
            let body = r.snippet(300).await;
            findings.fail(
                "signature accepted",
                name,
                format!("the homeserver rejected a request signed with {id}: {body}"),
                "merge the media repo's key into the homeserver's key file and restart it".into(),
            );
        }
        // Past authentication: the profile exists or not (or the homeserver hides profiles).
        Ok((_, r)) if r.status().is_success() || matches!(r.status().as_u16(), 403 | 404) => {
            findings.ok(
                "signature accepted",
                name,
                format!(
                    "the homeserver accepts requests signed with {id} ({})",
                    r.status()
                ),
            )
        }
        Ok((_, r)) => findings.warn(
            "signature accepted",
            name,
            format!(
                "cannot tell: a request signed with {id} was answered {}",
                r.status()
            ),
            "check that the homeserver's federation API answers".into(),
        ),
        Err(e) => findings.fail(
            "signature accepted",
            name,
            format!("a signed request failed: {e}"),
            "".into(),
        ),
    }
}

/// The clock difference with a server's `Date` header.
fn check_skew(findings: &mut Findings, subject: &str, whose: &str, headers: &header::HeaderMap) {
    let Some(date) = headers
        .get(header::DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok())
    else {
        return;
    };
    report_skew(findings, subject, whose, date);
}

fn report_skew(findings: &mut Findings, subject: &str, whose: &str, theirs: SystemTime) {
    let now = SystemTime::now();
    let skew = now
        .duration_since(theirs)
        .or_else(|_| theirs.duration_since(now))
        .unwrap_or_default();
    let message = format!(
        "this machine's clock and {whose}'s differ by {} s",
        skew.as_secs()
    );
    let fix = "synchronise the clocks (systemd-timesyncd, chrony)".to_owned();
    if skew > SKEW_FAIL {
        findings.fail("clock", subject, message, fix);
    } else if skew > SKEW_WARN {
        findings.warn("clock", subject, message, fix);
    } else {
        findings.ok("clock", subject, message);
    }
}

async fn check_database(findings: &mut Findings, config: &config::Config) {
    let check = "database";
    let fix = "check database.postgres in the config, and that PostgreSQL runs and accepts the \
               media repo's user";
    let connected = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_postgres::connect(&config.database.postgres, tokio_postgres::NoTls),
    )
    .await;
    let client = match connected {
        Ok(Ok((client, connection))) => {
            tokio::spawn(connection);
            client
        }
        Ok(Err(e)) => {
            findings.fail(
                check,
                "postgres",
                format!("cannot connect: {e}"),
                fix.into(),
            );
            return;
        }
        Err(_) => {
            findings.fail(
                check,
                "postgres",
                "no answer within 10 s".into(),
                fix.into(),
            );
            return;
        }
    };
    let row = tokio::time::timeout(
        Duration::from_secs(10),
        client.query_one(
            "SELECT (SELECT COALESCE(MAX(version), 0) FROM mmrctl_migrations), \
             EXTRACT(EPOCH FROM now())::float8",
            &[],
        ),
    )
    .await;
    match row {
        Err(_) => findings.fail(
            check,
            "postgres",
            "connected, but a query got no answer within 10 s".into(),
            fix.into(),
        ),
        Ok(Ok(row)) => {
            let version: i32 = row.get(0);
            let epoch: f64 = row.get(1);
            findings.ok(
                check,
                "postgres",
                format!("connected; schema version {version}"),
            );
            let theirs = SystemTime::UNIX_EPOCH + Duration::from_secs_f64(epoch.max(0.0));
            report_skew(findings, "postgres", "the database", theirs);
        }
        Ok(Err(e)) => findings.fail(
            check,
            "postgres",
            format!("connected, but the media repo's tables cannot be read: {e}"),
            "start `mmrctl serve` once (it creates the schema), with a user that owns the database"
                .into(),
        ),
    }
}

async fn check_datastores(findings: &mut Findings, config: &config::Config) {
    for ds in &config.datastores {
        let subject = format!("datastore {}", ds.id);
        let probed =
            tokio::time::timeout(Duration::from_secs(30), store::Datastore::probe_config(ds))
                .await
                .unwrap_or_else(|_| Err(store::Error::Config("no answer within 30 s".to_owned())));
        match probed {
            Ok(probe) => {
                findings.ok(
                    "datastore",
                    &subject,
                    "an object was written, read back and deleted",
                );
                if let Some(space) = probe.space {
                    let percent = space.free_bytes as f64 * 100.0 / space.total_bytes.max(1) as f64;
                    let message = format!(
                        "{:.1} GiB free of {:.1} GiB ({percent:.0}%)",
                        space.free_bytes as f64 / (1u64 << 30) as f64,
                        space.total_bytes as f64 / (1u64 << 30) as f64
                    );
                    let fix = "free space or move media to another datastore (`mmrctl datastores \
                               transfer`)"
                        .to_owned();
                    if percent < 1.0 {
                        findings.fail("disk space", &subject, message, fix);
                    } else if percent < 10.0 || space.free_bytes < 1 << 30 {
                        findings.warn("disk space", &subject, message, fix);
                    } else {
                        findings.ok("disk space", &subject, message);
                    }
                }
            }
            Err(e) => findings.fail(
                "datastore",
                &subject,
                format!("not writable or not readable: {e}"),
                "check the datastore's path and permissions (file), or its endpoint, bucket and \
                 credentials (S3)"
                    .into(),
            ),
        }
    }
}
