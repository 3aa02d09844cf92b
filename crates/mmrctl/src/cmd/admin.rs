//! `mmrctl admin …`: the common admin API calls (purge, quarantine, usage, tasks, transfers)
//! against the running service, for operators who script. The config says where the service
//! listens and which homeserver to name; the shared secret (when `sharedSecretAuth` is on) or
//! `--token` / `MMRCTL_ACCESS_TOKEN` says who asks.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::Value;

#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    config: crate::ConfigArg,
    /// The service's base URL (default: `repo.bindAddress` and `repo.port` of the config).
    #[arg(long, global = true, value_name = "URL")]
    url: Option<String>,
    /// The homeserver the requests are for (default: the config's first).
    #[arg(long, global = true, value_name = "SERVER")]
    homeserver: Option<String>,
    /// An admin's access token (default: the shared secret, when enabled).
    #[arg(
        long,
        global = true,
        env = "MMRCTL_ACCESS_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// Print the service's JSON answer as it is.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Delete media, their thumbnails, and every file nothing references any more.
    #[command(subcommand)]
    Purge(Purge),
    /// Stop serving media, and refuse its content from now on (every media with the same bytes).
    #[command(subcommand)]
    Quarantine(Target),
    /// Serve a media's content again, and accept it again.
    Unquarantine {
        /// `mxc://server/media_id`
        mxc: String,
    },
    /// What a server stores: media and thumbnails, in files and bytes.
    Usage {
        server: String,
        /// Per user, with their uploads.
        #[arg(long)]
        users: bool,
    },
    /// Background tasks (transfers, purges), or one of them.
    Tasks {
        /// A task id.
        id: Option<i64>,
        /// Only those still running.
        #[arg(long)]
        unfinished: bool,
    },
    /// Move every object of one datastore to another as a background task of the service.
    Transfer {
        #[arg(long, value_name = "ID")]
        from: String,
        #[arg(long, value_name = "ID")]
        to: String,
        /// Wait until the task has finished, showing its progress.
        #[arg(long)]
        wait: bool,
    },
}

#[derive(clap::Subcommand)]
enum Purge {
    /// Cached remote media stored before a time.
    Remote(Before),
    /// Media stored before a time: remote only, unless --include-local.
    Old {
        #[command(flatten)]
        before: Before,
        #[arg(long)]
        include_local: bool,
    },
    /// Quarantined media.
    Quarantined,
    /// What a user uploaded.
    User {
        user_id: String,
        #[command(flatten)]
        before: Before,
    },
    /// A room's media, as the homeserver lists it.
    Room {
        room_id: String,
        #[command(flatten)]
        before: Before,
    },
    /// A server's media.
    Server {
        server: String,
        #[command(flatten)]
        before: Before,
    },
    /// One media.
    Media { mxc: String },
}

#[derive(clap::Args)]
struct Before {
    /// Only media stored before this: milliseconds since the epoch, or an age (`30d`, `12h`,
    /// `90m`). Default: now.
    #[arg(long, value_name = "TIME")]
    before: Option<String>,
}

#[derive(clap::Subcommand)]
enum Target {
    /// One media (`mxc://server/media_id`), and every media with the same content.
    Media { mxc: String },
    /// Everything a user uploaded.
    User { user_id: String },
    /// A room's media, as the homeserver lists it.
    Room { room_id: String },
    /// Everything of a server stored now.
    Server { server: String },
}

const PREFIX: &str = "/_matrix/media/unstable/admin";

/// `--before`: a time in ms, or an age before now.
fn before_ts(before: &Before, now_ms: i64) -> anyhow::Result<String> {
    let Some(text) = &before.before else {
        return Ok(now_ms.to_string());
    };
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms.to_string());
    }
    let (number, unit) = text.split_at(text.len().saturating_sub(1));
    let unit_ms = match unit {
        "d" => 86_400_000,
        "h" => 3_600_000,
        "m" => 60_000,
        "s" => 1_000,
        _ => bail!(
            "--before {text}: give milliseconds since the epoch, or an age like 30d, 12h, 90m"
        ),
    };
    let n: i64 = number
        .parse()
        .with_context(|| format!("--before {text}: `{number}` is not a whole number"))?;
    Ok((now_ms - n.saturating_mul(unit_ms)).to_string())
}

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// `mxc://server/id` as its path part `server/id`.
fn mxc_path(mxc: &str) -> anyhow::Result<String> {
    let rest = mxc
        .strip_prefix("mxc://")
        .and_then(|r| r.split_once('/'))
        .filter(|(s, id)| !s.is_empty() && !id.is_empty() && !id.contains('/'))
        .with_context(|| format!("`{mxc}` is not an mxc URI (mxc://server/media_id)"))?;
    Ok(format!("{}/{}", enc(rest.0), enc(rest.1)))
}

/// The request a command makes: method and path.
fn request(command: &Command, now_ms: i64) -> anyhow::Result<(&'static str, String)> {
    let q = |b: &Before| before_ts(b, now_ms).map(|t| format!("?before_ts={t}"));
    Ok(match command {
        Command::Purge(p) => (
            "POST",
            match p {
                Purge::Remote(b) => format!("{PREFIX}/purge/remote{}", q(b)?),
                Purge::Old {
                    before,
                    include_local,
                } => format!(
                    "{PREFIX}/purge/old{}&include_local={include_local}",
                    q(before)?
                ),
                Purge::Quarantined => format!("{PREFIX}/purge/quarantined"),
                Purge::User { user_id, before } => {
                    format!("{PREFIX}/purge/user/{}{}", enc(user_id), q(before)?)
                }
                Purge::Room { room_id, before } => {
                    format!("{PREFIX}/purge/room/{}{}", enc(room_id), q(before)?)
                }
                Purge::Server { server, before } => {
                    format!("{PREFIX}/purge/server/{}{}", enc(server), q(before)?)
                }
                Purge::Media { mxc } => format!("{PREFIX}/purge/{}", mxc_path(mxc)?),
            },
        ),
        Command::Quarantine(t) => (
            "POST",
            match t {
                Target::Media { mxc } => format!("{PREFIX}/quarantine/{}", mxc_path(mxc)?),
                Target::User { user_id } => format!("{PREFIX}/quarantine/user/{}", enc(user_id)),
                Target::Room { room_id } => format!("{PREFIX}/quarantine/room/{}", enc(room_id)),
                Target::Server { server } => {
                    format!("{PREFIX}/quarantine/server/{}", enc(server))
                }
            },
        ),
        Command::Unquarantine { mxc } => {
            ("POST", format!("{PREFIX}/unquarantine/{}", mxc_path(mxc)?))
        }
        Command::Usage { server, users } => (
            "GET",
            format!(
                "{PREFIX}/usage/{}{}",
                enc(server),
                if *users { "/users" } else { "" }
            ),
        ),
        Command::Tasks { id: Some(id), .. } => ("GET", format!("{PREFIX}/tasks/{id}")),
        Command::Tasks { unfinished, .. } => (
            "GET",
            format!(
                "{PREFIX}/tasks/{}",
                if *unfinished { "unfinished" } else { "all" }
            ),
        ),
        Command::Transfer { from, to, .. } => (
            "POST",
            format!("{PREFIX}/datastores/{}/transfer_to/{}", enc(from), enc(to)),
        ),
    })
}

/// A one-line summary of an answer, for people.
fn summary(command: &Command, answer: &Value) -> String {
    match command {
        Command::Purge(_) if answer["purged"] == false => format!(
            "the purge is still running as task {}: see `mmrctl admin tasks {}`",
            answer["task_id"], answer["task_id"]
        ),
        Command::Purge(Purge::Remote(_)) => {
            format!("{} remote media purged", answer["num_removed"])
        }
        Command::Purge(_) => format!(
            "{} media purged ({} thumbnails, {} files deleted)",
            answer["total"], answer["thumbnails"], answer["objects_deleted"]
        ),
        Command::Quarantine(_) => format!("{} media quarantined", answer["num_quarantined"]),
        Command::Unquarantine { .. } => {
            format!("{} media unquarantined", answer["num_unquarantined"])
        }
        Command::Usage { users: false, .. } => format!(
            "media: {} files, {} bytes; thumbnails: {} files, {} bytes",
            answer["raw_counts"]["media"],
            answer["raw_bytes"]["media"],
            answer["raw_counts"]["thumbnails"],
            answer["raw_bytes"]["thumbnails"]
        ),
        Command::Usage { users: true, .. } => answer
            .as_object()
            .map(|users| {
                users
                    .iter()
                    .map(|(user, u)| {
                        format!(
                            "{user}: {} files, {} bytes",
                            u["raw_counts"]["media"], u["raw_bytes"]["media"]
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default(),
        Command::Tasks { id: Some(_), .. } => task_line(answer),
        Command::Tasks { .. } => answer
            .as_array()
            .map(|tasks| tasks.iter().map(task_line).collect::<Vec<_>>().join("\n"))
            .unwrap_or_default(),
        Command::Transfer { .. } => format!(
            "task {} moves {} objects ({} bytes)",
            answer["task_id"], answer["total_hashes_affected"], answer["total_bytes"]
        ),
    }
}

fn task_line(t: &Value) -> String {
    let state = if t["is_finished"] != true {
        "running".to_owned()
    } else if t["error_message"].as_str().is_some_and(|e| !e.is_empty()) {
        format!(
            "failed: {}",
            t["error_message"].as_str().unwrap_or_default()
        )
    } else {
        "finished".to_owned()
    };
    format!(
        "{} {} {state} {}",
        t["task_id"],
        t["task_name"].as_str().unwrap_or_default(),
        t["progress"]
    )
}

pub(crate) fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let loaded = config::Config::load_valid(&args.config.config)?;
    let config = &loaded.config;
    let url = match &args.url {
        Some(u) => u.trim_end_matches('/').to_owned(),
        None => {
            let host = match config.repo.bind_address.as_str() {
                "" | "0.0.0.0" => "127.0.0.1".to_owned(),
                "::" => "[::1]".to_owned(),
                a if a.contains(':') => format!("[{a}]"),
                a => a.to_owned(),
            };
            format!("http://{host}:{}", config.repo.port)
        }
    };
    let homeserver = match &args.homeserver {
        Some(h) => h.clone(),
        None => config
            .homeservers
            .first()
            .map(|h| h.name.clone())
            .context("the config serves no homeserver: give --homeserver")?,
    };
    let token = match &args.token {
        Some(t) => t.clone(),
        None if config.shared_secret_auth.enabled => config.shared_secret_auth.token.clone(),
        None => bail!(
            "no access token: give --token (or MMRCTL_ACCESS_TOKEN) with a repo admin's token, \
             or enable sharedSecretAuth in {}",
            args.config.config.display()
        ),
    };
    let runtime = crate::runtime()?;
    runtime.block_on(async {
        let http = outbound::Client::new(concat!("mmrctl/", env!("CARGO_PKG_VERSION")), None)?;
        let call = async |method: &str, path: &str| -> anyhow::Result<Value> {
            let method = outbound::Method::from_bytes(method.as_bytes())?;
            let target = format!("{url}{path}");
            let response = http
                .send(
                    method,
                    &target,
                    outbound::Purpose::homeserver(Duration::from_secs(3600)),
                    |r| r.bearer_auth(&token).header("Host", &homeserver),
                )
                .await
                .with_context(|| format!("cannot reach the media repo at {url}"))?;
            let status = response.status();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            if !status.is_success() {
                bail!(
                    "the media repo answered HTTP {status}: {} ({})",
                    body["error"].as_str().unwrap_or("no message"),
                    body["errcode"].as_str().unwrap_or("?")
                );
            }
            Ok(body)
        };
        let (method, path) = request(&args.command, store::now_ms())?;
        let answer = call(method, &path).await?;
        print(args, &args.command, &answer);
        if let Command::Transfer { wait: true, .. } = &args.command {
            let task = format!("{PREFIX}/tasks/{}", answer["task_id"]);
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let t = call("GET", &task).await?;
                if !args.json {
                    eprintln!("{}", task_line(&t));
                }
                if t["is_finished"] == true {
                    print(
                        args,
                        &Command::Tasks {
                            id: Some(0),
                            unfinished: false,
                        },
                        &t,
                    );
                    let failed = t["error_message"].as_str().is_some_and(|e| !e.is_empty())
                        || t["progress"]["failed"].as_u64().unwrap_or(0) > 0;
                    return Ok(if failed {
                        ExitCode::FAILURE
                    } else {
                        ExitCode::SUCCESS
                    });
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

#[allow(clippy::print_stdout)] // The command's output.
fn print(args: &Args, command: &Command, answer: &Value) {
    if args.json {
        println!("{answer}");
    } else {
        println!("{}", summary(command, answer));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_and_times_for_before() {
        let b = |s: &str| Before {
            before: Some(s.to_owned()),
        };
        assert_eq!(before_ts(&b("1234"), 10_000_000).unwrap(), "1234");
        assert_eq!(before_ts(&b("2h"), 10_000_000).unwrap(), "2800000");
        assert_eq!(before_ts(&Before { before: None }, 5).unwrap(), "5");
        let e = before_ts(&b("2w"), 0).unwrap_err().to_string();
        assert!(e.contains("30d"), "{e}");
    }

    #[test]
    fn mxc_uris_become_paths() {
        assert_eq!(
            mxc_path("mxc://a.test:8448/abc").unwrap(),
            "a%2Etest%3A8448/abc"
        );
        assert!(mxc_path("https://a.test/abc").is_err());
        assert!(mxc_path("mxc://a.test/").is_err());
    }
}
