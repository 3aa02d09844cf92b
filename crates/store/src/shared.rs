//! What instances share beyond media: rate-limit buckets and remembered failures. In Redis when
//! the config's `redis` section is enabled (matrix-media-repo's shards: each key lives on one,
//! chosen by its hash), else in two UNLOGGED Postgres tables.
//!
//! Redis that cannot be reached is an error here, fast (one attempt a second, each bounded by
//! [`REDIS_PATIENCE`]), and callers fall back to their instance's own state: limits then hold per
//! instance, failures are remembered per instance, until Redis answers again.
//!
//! A bucket is one number, the time it is empty again: each charge pushes it `cost` later, and
//! a [`Rule`] says how far ahead of now it may be. That makes the request limit (a token bucket)
//! and the download limit (a leaky bucket of bytes) one rule, applied in one statement in either
//! backend, so that concurrent charges from any instance never pass together.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;

use crate::{Error, Store, now_ms};

/// How long one Redis command may take before the caller falls back.
const REDIS_PATIENCE: Duration = Duration::from_millis(250);
/// How often an unreachable Redis is tried again.
const REDIS_RETRY: Duration = Duration::from_secs(1);
/// Postgres rows of buckets idle this long are deleted by [`Store::expire_shared`].
const BUCKET_IDLE_MS: f64 = 60_000.0;

/// How far a bucket may be filled, in milliseconds of draining.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rule {
    /// What this charge adds.
    pub cost_ms: f64,
    /// A bucket this full takes nothing more.
    pub capacity_ms: f64,
    /// No charge may fill it beyond this.
    pub most_ms: f64,
}

impl Rule {
    /// One request of `rate` per second with `burst`.
    pub fn request(rate: f64, burst: u32) -> Rule {
        let cost_ms = 1000.0 / rate.max(0.001);
        let full = cost_ms * f64::from(burst.max(1));
        Rule {
            cost_ms,
            capacity_ms: full,
            most_ms: full,
        }
    }

    /// `bytes` into a bucket of `capacity` bytes draining `per_minute`, which may overflow by
    /// `overflow` bytes.
    pub fn bytes(bytes: u64, per_minute: u64, capacity: u64, overflow: u64) -> Rule {
        let ms_per_byte = 60_000.0 / per_minute.max(1) as f64;
        Rule {
            cost_ms: bytes as f64 * ms_per_byte,
            capacity_ms: capacity as f64 * ms_per_byte,
            most_ms: (capacity + overflow) as f64 * ms_per_byte,
        }
    }

    /// Applies the rule to a bucket `backlog_ms` from empty: the new backlog, or how long to
    /// wait. An empty bucket takes any one charge (else one larger than the bucket never passes).
    pub fn charge(&self, backlog_ms: f64) -> Result<f64, Duration> {
        let backlog = backlog_ms.max(0.0);
        if backlog == 0.0 || (backlog < self.capacity_ms && backlog + self.cost_ms <= self.most_ms)
        {
            return Ok(backlog + self.cost_ms);
        }
        let target = self.capacity_ms.min(self.most_ms - self.cost_ms).max(0.0);
        Err(Duration::from_secs_f64(
            ((backlog - target) / 1000.0).max(0.001),
        ))
    }
}

/// [`Rule::charge`] in Redis: KEYS[1] the bucket; ARGV now, cost, capacity, most (ms). Returns 0
/// when charged, else the wait in ms (at least 1).
const CHARGE_LUA: &str = r"
local now = tonumber(ARGV[1])
local cost, capacity, most = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local backlog = math.max(0, (tonumber(redis.call('GET', KEYS[1])) or 0) - now)
if backlog == 0 or (backlog < capacity and backlog + cost <= most) then
  redis.call('SET', KEYS[1], tostring(now + backlog + cost), 'PX', math.ceil(backlog + cost) + 1000)
  return 0
end
local target = math.max(0, math.min(capacity, most - cost))
return math.max(1, math.ceil(backlog - target))
";

/// [`Rule::charge`] in Postgres ($1 key, $2 now, $3 cost, $4 capacity, $5 most): a row only
/// when charged.
const CHARGE_SQL: &str = "INSERT INTO shared_buckets AS b (key, empty_at)
     VALUES ($1, $2::FLOAT8 + $3::FLOAT8)
     ON CONFLICT (key) DO UPDATE SET empty_at = GREATEST(b.empty_at, $2) + $3
     WHERE b.empty_at <= $2 OR (b.empty_at - $2 < $4::FLOAT8 AND b.empty_at - $2 + $3 <= $5::FLOAT8)
     RETURNING empty_at";

struct Shard {
    client: redis::Client,
    connection: tokio::sync::Mutex<Option<ConnectionManager>>,
    /// Until when this shard is treated as down (after a failure).
    down_until: Mutex<Option<Instant>>,
}

/// The Redis shards of the config.
pub(crate) struct Redis {
    shards: Vec<Shard>,
    charge: redis::Script,
}

impl Redis {
    pub(crate) fn from_config(config: &config::Config) -> Result<Option<Redis>, Error> {
        let r = &config.redis;
        if !r.enabled {
            return Ok(None);
        }
        if r.shards.is_empty() {
            return Err(Error::Config(
                "redis.enabled is true but redis.shards is empty: list at least one shard (name, addr host:port), or disable redis".into(),
            ));
        }
        let mut shards: Vec<_> = r.shards.iter().enumerate().collect();
        // Every instance picks the same shard for a key, whatever the order of the list.
        shards.sort_by(|a, b| a.1.name.cmp(&b.1.name));
        let shards = shards
            .into_iter()
            .map(|(i, shard)| {
                let url = format!("redis://{}/{}", shard.addr, r.database_number);
                let client = redis::Client::open(url.as_str()).map_err(|e| {
                    Error::Config(format!(
                        "redis.shards[{i}].addr ({:?}) is not a Redis address: {e}; write host:port",
                        shard.addr
                    ))
                })?;
                Ok(Shard {
                    client,
                    connection: tokio::sync::Mutex::new(None),
                    down_until: Mutex::new(None),
                })
            })
            .collect::<Result<_, Error>>()?;
        Ok(Some(Redis {
            shards,
            charge: redis::Script::new(CHARGE_LUA),
        }))
    }

    fn shard(&self, key: &str) -> &Shard {
        use sha2::Digest as _;
        let digest = sha2::Sha256::digest(key.as_bytes());
        let n = u64::from_be_bytes(digest[..8].try_into().unwrap_or_default());
        &self.shards[(n % self.shards.len() as u64) as usize]
    }

    /// Runs `command` on the shard of `key`: an error when the shard is down or slow.
    async fn run<T>(
        &self,
        key: &str,
        command: impl AsyncFnOnce(&mut ConnectionManager) -> redis::RedisResult<T>,
    ) -> Result<T, Error> {
        let shard = self.shard(key);
        let down = Error::Redis;
        if let Some(until) = *shard.down_until.lock().unwrap_or_else(|p| p.into_inner())
            && Instant::now() < until
        {
            return Err(down("down a moment ago; not asked again yet".into()));
        }
        let result = tokio::time::timeout(REDIS_PATIENCE * 4, async {
            let mut connection = {
                let mut slot = shard.connection.lock().await;
                match &*slot {
                    Some(c) => c.clone(),
                    None => {
                        let config = redis::aio::ConnectionManagerConfig::new()
                            .set_connection_timeout(Some(REDIS_PATIENCE))
                            .set_response_timeout(Some(REDIS_PATIENCE))
                            .set_number_of_retries(1);
                        let c = shard
                            .client
                            .get_connection_manager_with_config(config)
                            .await
                            .map_err(|e| down(e.to_string()))?;
                        *slot = Some(c.clone());
                        c
                    }
                }
            };
            command(&mut connection)
                .await
                .map_err(|e| down(e.to_string()))
        })
        .await
        .unwrap_or_else(|_| Err(down("no answer in time".into())));
        if result.is_err() {
            *shard.down_until.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(Instant::now() + REDIS_RETRY);
        }
        result
    }
}

fn redis_key(key: &str) -> String {
    format!("mmrctl:{key}")
}

impl Store {
    /// Charges bucket `key` by `rule`, for every instance: `Ok(Err(wait))` when over.
    pub async fn charge_shared(
        &self,
        key: &str,
        rule: &Rule,
    ) -> Result<Result<(), Duration>, Error> {
        let now = now_ms() as f64;
        if let Some(redis) = &self.redis {
            let key = redis_key(key);
            let wait: u64 = redis
                .run(&key, async |c| {
                    redis
                        .charge
                        .key(&key)
                        .arg(now)
                        .arg(rule.cost_ms)
                        .arg(rule.capacity_ms)
                        .arg(rule.most_ms)
                        .invoke_async(c)
                        .await
                })
                .await?;
            return Ok(match wait {
                0 => Ok(()),
                ms => Err(Duration::from_millis(ms)),
            });
        }
        let client = self.client().await?;
        let charged = client
            .query_opt(
                CHARGE_SQL,
                &[&key, &now, &rule.cost_ms, &rule.capacity_ms, &rule.most_ms],
            )
            .await?;
        if charged.is_some() {
            return Ok(Ok(()));
        }
        let empty_at: f64 = client
            .query_opt(
                "SELECT empty_at FROM shared_buckets WHERE key = $1",
                &[&key],
            )
            .await?
            .map_or(now, |r| r.get(0));
        Ok(rule.charge(empty_at - now).map(|_| ()))
    }

    /// Remembers `value` under `key` for `ttl`, for every instance.
    pub async fn note_shared(&self, key: &str, value: &str, ttl: Duration) -> Result<(), Error> {
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        if let Some(redis) = &self.redis {
            let key = redis_key(key);
            return redis
                .run(&key, async |c| {
                    redis::cmd("SET")
                        .arg(&key)
                        .arg(value)
                        .arg("PX")
                        .arg(ms)
                        .query_async::<()>(c)
                        .await
                })
                .await;
        }
        self.client()
            .await?
            .execute(
                "INSERT INTO shared_notes (key, value, until_ts) VALUES ($1, $2, $3)
                 ON CONFLICT (key) DO UPDATE SET value = $2, until_ts = $3",
                &[&key, &value, &(now_ms() + ms as i64)],
            )
            .await?;
        Ok(())
    }

    /// What [`Store::note_shared`] remembered under `key`, while it is remembered.
    pub async fn recall_shared(&self, key: &str) -> Result<Option<String>, Error> {
        if let Some(redis) = &self.redis {
            let key = redis_key(key);
            return redis
                .run(&key, async |c| {
                    redis::cmd("GET").arg(&key).query_async(c).await
                })
                .await;
        }
        let client = self.client().await?;
        let select = client
            .prepare_cached("SELECT value FROM shared_notes WHERE key = $1 AND until_ts > $2")
            .await?;
        Ok(client
            .query_opt(&select, &[&key, &now_ms()])
            .await?
            .map(|r| r.get(0)))
    }

    /// Forgets `key` for every instance.
    pub async fn forget_shared(&self, key: &str) -> Result<(), Error> {
        if let Some(redis) = &self.redis {
            let key = redis_key(key);
            return redis
                .run(&key, async |c| {
                    redis::cmd("DEL").arg(&key).query_async::<()>(c).await
                })
                .await;
        }
        self.client()
            .await?
            .execute("DELETE FROM shared_notes WHERE key = $1", &[&key])
            .await?;
        Ok(())
    }

    /// Deletes the Postgres rows of idle buckets and of notes past their time (Redis expires its
    /// own); returns how many.
    pub async fn expire_shared(&self) -> Result<u64, Error> {
        let client = self.client().await?;
        let now = now_ms();
        let buckets = client
            .execute(
                "DELETE FROM shared_buckets WHERE empty_at < $1",
                &[&(now as f64 - BUCKET_IDLE_MS)],
            )
            .await?;
        let notes = client
            .execute("DELETE FROM shared_notes WHERE until_ts <= $1", &[&now])
            .await?;
        Ok(buckets + notes)
    }

    /// Whether a Redis section is in use (else Postgres is shared).
    pub fn shares_through_redis(&self) -> bool {
        self.redis.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rate_decides() {
        // 2 per second, burst 3: each request is 500 ms, the bucket holds 1500.
        let rule = Rule::request(2.0, 3);
        let mut backlog = 0.0;
        for _ in 0..3 {
            backlog = rule.charge(backlog).unwrap();
        }
        assert_eq!(backlog, 1500.0);
        assert_eq!(rule.charge(backlog), Err(Duration::from_millis(500)));
        // 200 ms later: still 300 ms to wait.
        assert_eq!(
            rule.charge(backlog - 200.0),
            Err(Duration::from_millis(300))
        );
        assert_eq!(rule.charge(backlog - 500.0), Ok(1500.0));
    }

    #[test]
    fn bytes_overflow_by_at_most_the_limit_and_an_empty_bucket_takes_one_large_file() {
        // 1000 bytes draining 60 per minute (1000 ms a byte), overflow 100.
        let per = |n| Rule::bytes(n, 60, 1000, 100);
        let full = per(900).charge(0.0).unwrap();
        assert_eq!(full, 900_000.0);
        // 900 + 250 > 1100: wait until 50 bytes drained.
        assert_eq!(per(250).charge(full), Err(Duration::from_secs(50)));
        let full = per(150).charge(full).unwrap();
        assert!(per(1).charge(full).is_err());
        assert!(per(5000).charge(0.0).is_ok());
    }
}
