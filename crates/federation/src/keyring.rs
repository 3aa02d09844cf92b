//! The keys other servers publish (`GET /_matrix/key/v2/server`), to verify the X-Matrix
//! requests they send us.
//!
//! A server's keys are fetched from the server itself (no notary), accepted only when the answer
//! names that server and is signed by the keys it lists, and cached until the answer's
//! `valid_until_ts` but at most 7 days (the spec's rule). Concurrent fetches for one server are
//! one fetch. A request signed with a key id the cache does not have fetches once more (at most
//! every few seconds per server, so that forged headers cannot turn us into a fetch amplifier).
//! Keys past their validity, and `old_verify_keys`, never authenticate a request.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use keys::KeyId;
use outbound::{Purpose, StatusCode};
use serde_json::Value;

use crate::client::Client;

/// The spec caps how long a key answer may be trusted.
const MAX_CACHE: Duration = Duration::from_secs(7 * 24 * 3600);
/// A refetch for an unknown key id happens at most this often per server.
const REFETCH_EVERY: Duration = Duration::from_secs(5);
/// Servers whose keys are kept; beyond that the least used are dropped.
const MAX_SERVERS: u64 = 10_000;
/// Key answers are small; Synapse's, with years of old keys, stay far below this.
const MAX_ANSWER_BYTES: u64 = 64 * 1024;
/// Keys an answer may list: each one's signature costs a pass over the answer.
const MAX_KEYS: usize = 32;
/// A server whose keys could not be fetched is not asked again for this long (so that forged
/// origins cannot make us send a request per request they send).
const FAILURE_REMEMBERED: Duration = Duration::from_secs(60);
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request or a key answer was not accepted. The text is the 401's reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("cannot fetch the keys of {server}: {reason}")]
    Fetch { server: String, reason: String },
    #[error("the keys {server} published are not valid: {reason}")]
    BadAnswer { server: String, reason: String },
    #[error("{server} publishes no key {key_id} valid now")]
    UnknownKey { server: String, key_id: String },
    #[error(
        "the signature does not match the request (method, URI with its query, origin, destination)"
    )]
    BadSignature,
}

/// A server's keys valid for requests, as one answer gave them.
#[derive(Debug, Clone)]
pub struct ServerKeys {
    keys: HashMap<String, ed25519_dalek::VerifyingKey>,
    /// Epoch ms after which no key of this answer authenticates anything.
    valid_until_ms: i64,
    fetched_ms: i64,
}

impl ServerKeys {
    fn cache_for(&self) -> Duration {
        let left = u64::try_from(self.valid_until_ms.saturating_sub(self.fetched_ms)).unwrap_or(0);
        Duration::from_millis(left).min(MAX_CACHE)
    }

    fn key(&self, key_id: &str, now_ms: i64) -> Option<&ed25519_dalek::VerifyingKey> {
        (now_ms < self.valid_until_ms)
            .then(|| self.keys.get(key_id))
            .flatten()
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Parses and checks `GET /_matrix/key/v2/server` from `server`: it must name `server`, list at
/// least one ed25519 key, carry an integer `valid_until_ts` (the spec's lesser-of-it-and-7-days
/// applies when caching), and be signed by `server` with keys it lists, every such signature
/// valid (at least one).
pub fn parse_server_keys(body: &[u8], server: &str, now_ms: i64) -> Result<ServerKeys, KeyError> {
    let bad = |reason: String| KeyError::BadAnswer {
        server: server.to_owned(),
        reason,
    };
    let value: Value = serde_json::from_slice(body).map_err(|e| bad(format!("not JSON: {e}")))?;
    let Value::Object(object) = &value else {
        return Err(bad("not a JSON object".into()));
    };
    match object.get("server_name") {
        Some(Value::String(name)) if name == server => {}
        Some(Value::String(name)) => {
            return Err(bad(format!("the answer is for `{name}`")));
        }
        _ => return Err(bad("no `server_name`".into())),
    }
    let valid_until_ms = object
        .get("valid_until_ts")
        .and_then(Value::as_i64)
        .ok_or_else(|| bad("no integer `valid_until_ts`".into()))?;
    let Some(Value::Object(listed)) = object.get("verify_keys") else {
        return Err(bad("no `verify_keys` object".into()));
    };
    if listed.len() > MAX_KEYS {
        return Err(bad(format!("more than {MAX_KEYS} keys")));
    }
    let mut keys = HashMap::new();
    for (id, entry) in listed {
        // Other algorithms may exist one day; only ed25519 ones can be checked here.
        let Ok(key_id) = id.parse::<KeyId>() else {
            continue;
        };
        let public = entry
            .get("key")
            .and_then(Value::as_str)
            .and_then(|k| STANDARD_NO_PAD.decode(k.trim_end_matches('=')).ok())
            .and_then(|raw| <[u8; 32]>::try_from(raw.as_slice()).ok())
            .and_then(|raw| ed25519_dalek::VerifyingKey::from_bytes(&raw).ok())
            .ok_or_else(|| {
                bad(format!(
                    "`verify_keys.{id}.key` is not an ed25519 public key"
                ))
            })?;
        keys.insert(key_id.to_string(), (key_id, public));
    }
    let signed_by: Vec<&String> = match object.get("signatures").and_then(|s| s.get(server)) {
        Some(Value::Object(by)) => by.keys().filter(|k| keys.contains_key(*k)).collect(),
        _ => Vec::new(),
    };
    if signed_by.is_empty() {
        return Err(bad(format!("not signed by {server} with a key it lists")));
    }
    for id in signed_by {
        let (key_id, public) = &keys[id];
        keys::verify_json(&value, server, key_id, public)
            .map_err(|e| bad(format!("self-signature: {e}")))?;
    }
    Ok(ServerKeys {
        keys: keys.into_iter().map(|(id, (_, k))| (id, k)).collect(),
        valid_until_ms,
        fetched_ms: now_ms,
    })
}

struct Lifetime;

impl moka::Expiry<String, Arc<ServerKeys>> for Lifetime {
    fn expire_after_create(
        &self,
        _: &String,
        keys: &Arc<ServerKeys>,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(keys.cache_for())
    }
}

/// Verifies X-Matrix requests against the origins' keys. Cheap to clone.
#[derive(Clone)]
pub struct Keyring {
    client: Client,
    cache: moka::future::Cache<String, Arc<ServerKeys>>,
    /// When each server was last refetched for an unknown key id.
    refetched: moka::sync::Cache<String, ()>,
    /// Servers whose keys could not be fetched lately, and why.
    failed: moka::sync::Cache<String, KeyError>,
}

/// What an X-Matrix request's signature covers.
#[derive(Debug, Clone, Copy)]
pub struct SignedRequest<'a> {
    pub method: &'a str,
    /// The request target exactly as received: path and query.
    pub uri: &'a str,
    pub origin: &'a str,
    pub destination: &'a str,
    pub key_id: &'a str,
    pub sig: &'a str,
}

impl Keyring {
    pub fn new(client: Client) -> Keyring {
        Keyring {
            client,
            cache: moka::future::Cache::builder()
                .max_capacity(MAX_SERVERS)
                .expire_after(Lifetime)
                .build(),
            refetched: moka::sync::Cache::builder()
                .max_capacity(MAX_SERVERS)
                .time_to_live(REFETCH_EVERY)
                .build(),
            failed: moka::sync::Cache::builder()
                .max_capacity(MAX_SERVERS)
                .time_to_live(FAILURE_REMEMBERED)
                .build(),
        }
    }

    /// Checks the request's signature with the origin's key `key_id`, fetching the origin's
    /// keys when they are not cached, or once more when the cached ones lack `key_id` (the
    /// cached ones stay when that fails).
    pub async fn verify(&self, request: &SignedRequest<'_>) -> Result<(), KeyError> {
        let origin = request.origin;
        let unknown = || KeyError::UnknownKey {
            server: origin.to_owned(),
            key_id: request.key_id.to_owned(),
        };
        let key_id: KeyId = request.key_id.parse().map_err(|_| unknown())?;
        if let Some(failure) = self.failed.get(origin) {
            return Err(failure);
        }
        let entry = self
            .cache
            .entry(origin.to_owned())
            .or_try_insert_with(self.fetch(origin))
            .await
            .map_err(|e| {
                self.failed.insert(origin.to_owned(), (*e).clone());
                (*e).clone()
            })?;
        let mut keys = entry.value().clone();
        if keys.key(request.key_id, now_ms()).is_none()
            && !entry.is_fresh()
            && !self.refetched.contains_key(origin)
        {
            self.refetched.insert(origin.to_owned(), ());
            match self.fetch(origin).await {
                Ok(fetched) => {
                    self.cache.insert(origin.to_owned(), fetched.clone()).await;
                    keys = fetched;
                }
                Err(e) => {
                    tracing::info!(origin, error = %e, "keys not refetched; the cached ones stay")
                }
            }
        }
        let public = keys.key(request.key_id, now_ms()).ok_or_else(unknown)?;
        let mut signed = keys::request_json(
            origin,
            request.destination,
            request.method,
            request.uri,
            None,
        );
        signed["signatures"] = serde_json::json!({ origin: { request.key_id: request.sig } });
        keys::verify_json(&signed, origin, &key_id, public).map_err(|_| KeyError::BadSignature)
    }

    async fn fetch(&self, server: &str) -> Result<Arc<ServerKeys>, KeyError> {
        let failed = |reason: String| KeyError::Fetch {
            server: server.to_owned(),
            reason,
        };
        let purpose = Purpose {
            total: Some(FETCH_TIMEOUT),
            read: FETCH_TIMEOUT,
            max_bytes: Some(MAX_ANSWER_BYTES),
            redirects: 0,
        };
        let (_, response) = self
            .client
            .get(server, "/_matrix/key/v2/server", None, purpose)
            .await
            .map_err(|e| failed(e.to_string()))?;
        if response.status() != StatusCode::OK {
            return Err(failed(format!("HTTP {}", response.status())));
        }
        let body = response.bytes().await.map_err(|e| failed(e.to_string()))?;
        let keys = parse_server_keys(&body, server, now_ms())?;
        tracing::debug!(server, keys = keys.keys.len(), "fetched server keys");
        Ok(Arc::new(keys))
    }
}

#[cfg(test)]
mod tests {
    use keys::SigningKey;
    use serde_json::json;

    use super::*;

    fn answer(server: &str, signers: &[&SigningKey], listed: &[&SigningKey], until: i64) -> Value {
        let verify_keys: serde_json::Map<String, Value> = listed
            .iter()
            .map(|k| (k.id().to_string(), json!({ "key": k.public_key_base64() })))
            .collect();
        let mut value = json!({
            "server_name": server,
            "verify_keys": verify_keys,
            "old_verify_keys": {},
            "valid_until_ts": until,
        });
        for k in signers {
            keys::sign_json(&mut value, server, k).unwrap();
        }
        value
    }

    fn bytes(v: &Value) -> Vec<u8> {
        serde_json::to_vec(v).unwrap()
    }

    #[test]
    fn accepts_a_self_signed_answer_and_caps_its_lifetime() {
        let a = SigningKey::generate().unwrap();
        let b = SigningKey::generate().unwrap();
        let now = 1_000_000;
        let day = 24 * 3600 * 1000;
        let keys = parse_server_keys(
            &bytes(&answer("s", &[&a, &b], &[&a, &b], now + day)),
            "s",
            now,
        )
        .unwrap();
        assert_eq!(keys.keys.len(), 2);
        assert_eq!(keys.cache_for(), Duration::from_millis(day as u64));
        let long = parse_server_keys(&bytes(&answer("s", &[&a], &[&a], now + 30 * day)), "s", now)
            .unwrap();
        assert_eq!(long.cache_for(), MAX_CACHE);
        assert!(long.key(&a.id().to_string(), now).is_some());
        assert!(
            long.key(&a.id().to_string(), now + 30 * day).is_none(),
            "expired keys never work"
        );
    }

    #[test]
    fn reads_an_answer_signed_by_an_independent_implementation() {
        // Made with Python's signedjson (the library Synapse signs with).
        let body = include_bytes!("../../../fuzz/seeds/server_keys/signed.json");
        let keys = parse_server_keys(body, "example.org", 1_700_000_000_000).unwrap();
        assert!(keys.key("ed25519:abc", 1_700_000_000_000).is_some());
        let mut tampered: Value = serde_json::from_slice(body).unwrap();
        tampered["valid_until_ts"] = json!(1_800_000_000_001_i64);
        assert!(parse_server_keys(&bytes(&tampered), "example.org", 0).is_err());
    }

    #[test]
    fn refuses_answers_that_are_not_the_servers_own() {
        let a = SigningKey::generate().unwrap();
        let other = SigningKey::generate().unwrap();
        let now = 5;
        let reason = |v: &Value, server: &str| match parse_server_keys(&bytes(v), server, now) {
            Err(KeyError::BadAnswer { reason, .. }) => reason,
            other => panic!("expected a refusal, got {other:?}"),
        };
        assert!(reason(&answer("s", &[&a], &[&a], 10), "t").contains("for `s`"));
        assert!(reason(&answer("s", &[], &[&a], 10), "s").contains("not signed"));
        // Signed only by a key it does not list.
        assert!(reason(&answer("s", &[&other], &[&a], 10), "s").contains("not signed"));
        // A listed key's signature that does not verify.
        let mut tampered = answer("s", &[&a], &[&a], 10);
        tampered["valid_until_ts"] = json!(99);
        assert!(reason(&tampered, "s").contains("self-signature"));
        let mut no_until = answer("s", &[&a], &[&a], 10);
        no_until.as_object_mut().unwrap().remove("valid_until_ts");
        assert!(reason(&no_until, "s").contains("valid_until_ts"));
        assert!(parse_server_keys(b"[1]", "s", now).is_err());
        assert!(parse_server_keys(b"{", "s", now).is_err());
    }
}
