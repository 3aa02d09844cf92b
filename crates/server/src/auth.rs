//! Who is asking: access tokens checked against the homeserver (`/account/whoami`), appservice tokens
//! from the config, the shared secret; a bounded cache of valid tokens; a per-homeserver backoff.

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode, header};
use config::{Config, Homeserver};
use moka::sync::Cache;

use crate::error::ApiError;
use crate::metrics::Metrics;

/// At most this many repo-admin tokens remembered for the rate limiter.
const ADMIN_TOKENS_CAPACITY: u64 = 1024;
/// At most this many cached tokens, whatever the traffic.
const CACHE_CAPACITY: u64 = 100_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct User {
    pub(crate) user_id: String,
    pub(crate) is_guest: bool,
    /// A repo admin: listed in `admins`, or the shared secret.
    pub(crate) is_admin: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    homeserver: String,
    token: String,
    as_user: Option<String>,
}

#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
    open_until: Option<Instant>,
}

/// What the homeserver said of tokens, for `accessTokens.maxCacheTimeSeconds`.
#[derive(Clone)]
struct Caches {
    users: Cache<CacheKey, User>,
    /// The tokens of repo admins among them: what the rate limiter, which runs before any
    /// authentication, knows of admins.
    admin_tokens: Cache<String, ()>,
}

pub(crate) struct Auth {
    http: outbound::Client,
    cache: RwLock<Option<Caches>>,
    backoff: Mutex<HashMap<String, Backoff>>,
}

/// The token of a request: `Authorization: Bearer`, else the deprecated `access_token` parameter.
/// A token that no homeserver could have issued (empty, or with characters that cannot travel in
/// an HTTP header) is refused here, as the client's error: it never reaches the homeserver, so it
/// can never count as the homeserver failing.
pub(crate) fn token(headers: &HeaderMap, query: Option<&str>) -> Result<String, ApiError> {
    let token = match headers.get(header::AUTHORIZATION) {
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim().to_owned()),
        None => query_param(query, "access_token"),
    };
    match token {
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "M_MISSING_TOKEN",
            "Missing access token",
        )),
        Some(t) if t.is_empty() => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "M_MISSING_TOKEN",
            "Missing access token",
        )),
        Some(t) if !t.bytes().all(|b| b.is_ascii_graphic()) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "M_UNKNOWN_TOKEN",
            "The access token is malformed: it may only hold printable ASCII characters",
        )),
        Some(t) => Ok(t),
    }
}

/// `@localpart:server`, short and without characters a database or a header would refuse.
pub(crate) fn is_valid_user_id(user_id: &str) -> bool {
    user_id.len() <= 255
        && user_id
            .strip_prefix('@')
            .and_then(|rest| rest.split_once(':'))
            .is_some_and(|(local, server)| {
                !local.is_empty() && !server.is_empty() && !user_id.chars().any(char::is_control)
            })
}

/// The server part of a user id, port included.
pub(crate) fn server_of(user_id: &str) -> Option<&str> {
    user_id.strip_prefix('@')?.split_once(':').map(|(_, s)| s)
}

pub(crate) fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        // Form encoding: `+` is a space (Go's and Python's clients encode spaces so).
        (k == name).then(|| {
            percent_encoding::percent_decode_str(&v.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

impl Auth {
    pub(crate) fn new(http: outbound::Client, config: &Config) -> Auth {
        let auth = Auth {
            http,
            cache: RwLock::new(None),
            backoff: Mutex::new(HashMap::new()),
        };
        auth.reconfigure(config);
        auth
    }

    /// Applies a (re)loaded config: the cache is rebuilt, which also flushes it, and every
    /// homeserver's backoff starts afresh (its address or threshold may have changed).
    pub(crate) fn reconfigure(&self, config: &Config) {
        self.backoff
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        let ttl = config.access_tokens.max_cache_time_seconds;
        let cache = (ttl > 0).then(|| Caches {
            users: Cache::builder()
                .max_capacity(CACHE_CAPACITY)
                .time_to_live(Duration::from_secs(ttl))
                .support_invalidation_closures()
                .build(),
            admin_tokens: Cache::builder()
                .max_capacity(ADMIN_TOKENS_CAPACITY)
                .time_to_live(Duration::from_secs(ttl))
                .build(),
        });
        *self.cache.write().unwrap_or_else(|p| p.into_inner()) = cache;
    }

    fn cache(&self) -> Option<Caches> {
        self.cache.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether `token` was recently found to be a repo admin's (`admins`).
    pub(crate) fn is_known_admin(&self, token: &str) -> bool {
        self.cache()
            .is_some_and(|c| c.admin_tokens.contains_key(token))
    }

    /// Authenticates a request for `hs`. Guests pass only where `allow_guests`. The user must be
    /// one of `hs`'s: a token of another server's user, sent with this server's name in
    /// `X-Forwarded-Host`, must not act for this server. Repo admins (`admins`, the shared secret)
    /// may act for every homeserver served.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn authenticate(
        &self,
        config: &Config,
        hs: &Homeserver,
        headers: &HeaderMap,
        query: Option<&str>,
        client_ip: &str,
        allow_guests: bool,
        metrics: &Metrics,
    ) -> Result<User, ApiError> {
        let token = token(headers, query)?;
        let as_user = query_param(query, "user_id");
        if let Some(user) = &as_user
            && !is_valid_user_id(user)
        {
            return Err(ApiError::bad_request(
                "`user_id` must be a Matrix user id (@localpart:server)",
            ));
        }
        let user = self
            .resolve(config, hs, &token, as_user, client_ip, metrics)
            .await?;
        if !user.is_admin
            && !server_of(&user.user_id).is_some_and(|s| s.eq_ignore_ascii_case(&hs.name))
        {
            return Err(ApiError::forbidden(format!(
                "{} is not a user of {}, which this request is for",
                user.user_id, hs.name
            )));
        }
        if user.is_guest && !allow_guests {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "M_GUEST_ACCESS_FORBIDDEN",
                "Guests cannot use this endpoint",
            ));
        }
        Ok(user)
    }

    async fn resolve(
        &self,
        config: &Config,
        hs: &Homeserver,
        token: &str,
        as_user: Option<String>,
        client_ip: &str,
        metrics: &Metrics,
    ) -> Result<User, ApiError> {
        let is_admin = |user_id: &str| config.admins.iter().any(|a| a == user_id);
        if config.shared_secret_auth.enabled && token == config.shared_secret_auth.token {
            return Ok(User {
                user_id: "@sharedsecret".to_owned(),
                is_guest: false,
                is_admin: true,
            });
        }
        if config.access_tokens.use_local_appservice_config
            && let Some(user) = appservice_user(config, token, as_user.as_deref())?
        {
            let is_admin = is_admin(&user);
            return Ok(User {
                user_id: user,
                is_guest: false,
                is_admin,
            });
        }
        let key = CacheKey {
            homeserver: hs.name.clone(),
            token: token.to_owned(),
            as_user,
        };
        let cache = self.cache();
        if let Some(user) = cache.as_ref().and_then(|c| c.users.get(&key)) {
            metrics.token_cache(true);
            return Ok(user);
        }
        metrics.token_cache(false);
        let (user_id, is_guest) = self
            .whoami(config, hs, token, key.as_user.as_deref(), client_ip)
            .await?;
        let user = User {
            is_admin: is_admin(&user_id),
            user_id,
            is_guest,
        };
        // Only answers the homeserver gave are cached; failures to reach it are not.
        if let Some(cache) = cache {
            if user.is_admin {
                cache.admin_tokens.insert(token.to_owned(), ());
            }
            cache.users.insert(key, user.clone());
        }
        Ok(user)
    }

    async fn whoami(
        &self,
        config: &Config,
        hs: &Homeserver,
        token: &str,
        as_user: Option<&str>,
        client_ip: &str,
    ) -> Result<(String, bool), ApiError> {
        if let Some(wait) = self.backoff_remaining(&hs.name) {
            return Err(ApiError::unavailable(
                format!(
                    "The homeserver {} is not answering; the media repository retries in {} s",
                    hs.name,
                    wait.as_secs().max(1)
                ),
                wait.as_secs().max(1),
            ));
        }
        let mut path = "/_matrix/client/v3/account/whoami".to_owned();
        if let Some(user) = as_user {
            path.push_str("?user_id=");
            path.extend(percent_encoding::utf8_percent_encode(
                user,
                percent_encoding::NON_ALPHANUMERIC,
            ));
        }
        let response = self
            .homeserver(config, hs, outbound::Method::GET, &path, |r| {
                let r = r.bearer_auth(token);
                if client_ip.is_empty() {
                    r
                } else {
                    r.header("X-Forwarded-For", client_ip)
                        .header("X-Real-IP", client_ip)
                }
            })
            .await;
        let response = match response {
            Ok(r) => r,
            // A request that was never sent says nothing about the homeserver.
            Err(e) if e.never_sent() => {
                tracing::error!(homeserver = %hs.name, error = %e, "cannot send the whoami request");
                return Err(ApiError::internal(
                    "Internal error; the media repository's log has the details",
                ));
            }
            Err(e) => {
                self.record(&hs.name, hs.backoff_at, false);
                return Err(ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "M_UNKNOWN",
                    format!(
                        "Cannot reach the homeserver {} to check the access token: {e}",
                        hs.name
                    ),
                ));
            }
        };
        let status = response.status();
        // Only 200, 401 and 403 are answers about the token. A redirect or another status means the
        // request did not reach a working whoami (a wrong `csApi`, a failing homeserver): never a
        // verdict that would log the user out.
        let verdict = [200, 401, 403].contains(&status.as_u16());
        if !verdict {
            self.record(&hs.name, hs.backoff_at, false);
            let location = response
                .headers()
                .get(outbound::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .unwrap_or_default();
            tracing::warn!(homeserver = %hs.name, %status, location, "whoami did not answer about the token");
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "M_UNKNOWN",
                format!(
                    "The homeserver {} failed to check the access token (HTTP {status})",
                    hs.name
                ),
            ));
        }
        self.record(&hs.name, hs.backoff_at, true);
        let body = response.json().await.unwrap_or_default();
        if status == outbound::StatusCode::OK {
            let user_id = body["user_id"].as_str().unwrap_or_default().to_owned();
            if !is_valid_user_id(&user_id) {
                return Err(ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "M_UNKNOWN",
                    "The homeserver's whoami answered without a valid user_id",
                ));
            }
            return Ok((user_id, body["is_guest"].as_bool().unwrap_or(false)));
        }
        let errcode = match body["errcode"].as_str() {
            Some("M_MISSING_TOKEN") => "M_MISSING_TOKEN",
            Some("M_FORBIDDEN") if status == outbound::StatusCode::FORBIDDEN => "M_FORBIDDEN",
            _ => "M_UNKNOWN_TOKEN",
        };
        let status = if errcode == "M_FORBIDDEN" {
            StatusCode::FORBIDDEN
        } else {
            StatusCode::UNAUTHORIZED
        };
        let message = body["error"]
            .as_str()
            .unwrap_or("Unrecognised access token")
            .to_owned();
        Err(ApiError::new(status, errcode, message))
    }

    fn backoff_remaining(&self, hs: &str) -> Option<Duration> {
        let map = self.backoff.lock().unwrap_or_else(|p| p.into_inner());
        let until = map.get(hs)?.open_until?;
        until.checked_duration_since(Instant::now())
    }

    /// Consecutive failures open the circuit after `backoff_at` of them, for a window that doubles
    /// with every further failure (at most a minute); one success closes it.
    fn record(&self, hs: &str, backoff_at: u32, ok: bool) {
        let mut map = self.backoff.lock().unwrap_or_else(|p| p.into_inner());
        let b = map.entry(hs.to_owned()).or_default();
        if ok {
            *b = Backoff::default();
            return;
        }
        b.failures += 1;
        let threshold = if backoff_at == 0 { 10 } else { backoff_at };
        if b.failures >= threshold {
            let exponent = (b.failures - threshold).min(6);
            let window = Duration::from_secs(1 << exponent).min(Duration::from_secs(60));
            b.open_until = Some(Instant::now() + window);
        }
    }

    /// Drops every cached token (logouts may have been missed).
    pub(crate) fn forget_all(&self) {
        if let Some(cache) = self.cache() {
            cache.users.invalidate_all();
            cache.admin_tokens.invalidate_all();
        }
    }

    /// Drops a logout from the cache: one token (named by [`token_hash`]) or every token of a
    /// user. What [`logout_message`] made, from any instance.
    pub(crate) fn forget(&self, message: &str) {
        let Some(Caches {
            users: cache,
            admin_tokens,
        }) = self.cache()
        else {
            return;
        };
        // Rare, and an admin's next request finds out again.
        admin_tokens.invalidate_all();
        if message == store::LOGOUTS_MISSED {
            cache.invalidate_all();
        } else if let Some(hash) = message.strip_prefix("token ") {
            let hash = hash.to_owned();
            let _ = cache.invalidate_entries_if(move |k, _| token_hash(&k.token) == hash);
        } else if let Some((hs, user)) = message
            .strip_prefix("user ")
            .and_then(|m| m.split_once(' '))
        {
            let (hs, user) = (hs.to_owned(), user.to_owned());
            let _ =
                cache.invalidate_entries_if(move |k, v| k.homeserver == hs && v.user_id == user);
        }
    }
}

/// A token as logouts name it between instances: never the token itself.
pub(crate) fn token_hash(token: &str) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

/// What a logout announces: `token <hash>` (`/logout`), or `user <homeserver> <user id>`
/// (`/logout/all`; neither has spaces).
pub(crate) fn logout_message(token: &str, all: Option<(&str, &str)>) -> String {
    match all {
        Some((hs, user)) => format!("user {hs} {user}"),
        None => format!("token {}", token_hash(token)),
    }
}

impl Auth {
    /// A request to the homeserver's client-server API at `path`, with the configured timeout;
    /// `prepare` adds headers and a body.
    pub(crate) async fn homeserver(
        &self,
        config: &Config,
        hs: &Homeserver,
        method: outbound::Method,
        path: &str,
        prepare: impl FnOnce(outbound::RequestBuilder) -> outbound::RequestBuilder,
    ) -> Result<outbound::Response, outbound::Error> {
        let url = format!("{}{path}", hs.cs_api.trim_end_matches('/'));
        let timeout = Duration::from_secs(u64::from(
            config.timeouts.client_server_timeout_seconds.max(1),
        ));
        self.http
            .send(
                method,
                &url,
                outbound::Purpose::homeserver(timeout),
                prepare,
            )
            .await
    }
}

/// An appservice token from the config: its sender, or `user_id` when inside its namespaces.
fn appservice_user(
    config: &Config,
    token: &str,
    as_user: Option<&str>,
) -> Result<Option<String>, ApiError> {
    let Some(service) = config
        .access_tokens
        .appservices
        .iter()
        .find(|a| a.as_token == token)
    else {
        return Ok(None);
    };
    match as_user {
        None => Ok(Some(service.sender_user_id.clone())),
        Some(user) if user == service.sender_user_id => Ok(Some(user.to_owned())),
        Some(user) => {
            let allowed = service.user_namespaces.iter().any(|ns| {
                regex::Regex::new(&format!("^(?:{})$", ns.regex)).is_ok_and(|re| re.is_match(user))
            });
            if allowed {
                Ok(Some(user.to_owned()))
            } else {
                Err(ApiError::forbidden(format!(
                    "The appservice `{}` may not masquerade as {user}",
                    service.id
                )))
            }
        }
    }
}
