//! The Redis fast tier.
//!
//! One key per session, `<prefix>s:<hex of the token hash>`, holding the
//! compact encoding of [`super::codec`], with the Redis expiry set to the
//! session's own (`PXAT`), so Redis drops what has expired by itself. A
//! revoked session's key holds a one-byte tombstone until the session
//! would have expired: a restore (`SET NX`) or an activity refresh (a
//! script that writes only over a live session) racing with the
//! revocation cannot bring it back, and every instance reading the key
//! learns of the revocation without asking the durable tier. Every command
//! on the request path touches exactly one key; the connection manager
//! multiplexes all requests over one connection (pipelining them) and
//! reconnects by itself.
//!
//! It is also the [`InvalidationBus`] of the in-process cache in front of
//! it ([`super::layered`]): messages are published on the channel
//! `<prefix>invalidate` over the same connection, and each subscriber
//! holds one dedicated pub/sub connection, pinged every
//! [`SUBSCRIPTION_PING`] so that a connection that died silently (a
//! partition) is noticed and replaced.
//!
//! With a `rediss://` URL both the command connection and every pub/sub
//! connection go over TLS (rustls), verifying the server's certificate
//! and name against [`RedisTls::ca_file`] or the system roots, and
//! presenting the client certificate when one is configured.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSubSink, PubSubStream};

use super::layered::{InvalidationBus, InvalidationFeed};
use super::{Cached, FastTier, StoreError, StoreResult, codec};
use crate::config::redact_url;
use crate::session::{Session, now_ms};
use crate::token::TokenHash;

const TIER: &str = "redis";
/// The value of a revoked session's key; session records start with 1.
const TOMBSTONE: &[u8] = &[0];
/// How often a subscription's connection is checked.
pub const SUBSCRIPTION_PING: Duration = Duration::from_secs(1);

/// Overwrites a key only while it holds a live session record.
const REFRESH_SCRIPT: &str = r"
local v = redis.call('GET', KEYS[1])
if v and string.byte(v, 1) == 1 then
  redis.call('SET', KEYS[1], ARGV[1], 'PXAT', ARGV[2])
  return 1
end
return 0
";

pub struct RedisTier {
    client: redis::Client,
    conn: ConnectionManager,
    refresh: redis::Script,
    prefix: String,
    channel: String,
    address: String,
    timeout: Duration,
}

fn unavailable(address: &str, e: redis::RedisError) -> StoreError {
    StoreError::Unavailable {
        tier: TIER,
        message: format!("{address}: {e}"),
    }
}

/// The TLS files of a `rediss://` connection (`store.redis_ca_file`,
/// `store.redis_client_cert_file`, `store.redis_client_key_file`).
#[derive(Debug, Clone, Default)]
pub struct RedisTls {
    /// PEM CA certificates to verify Redis with; none = the system roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) and key, for `tls-auth-clients`.
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
}

impl RedisTls {
    fn is_empty(&self) -> bool {
        self.ca_file.is_none() && self.client_cert_file.is_none() && self.client_key_file.is_none()
    }

    /// The files' contents, as the redis crate takes them.
    fn certificates(&self) -> Result<redis::TlsCertificates, String> {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
        };
        let root_cert = self.ca_file.as_ref().map(read).transpose()?;
        let client_tls = match (&self.client_cert_file, &self.client_key_file) {
            (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
                client_cert: read(cert)?,
                client_key: read(key)?,
            }),
            _ => None,
        };
        Ok(redis::TlsCertificates {
            client_tls,
            root_cert,
        })
    }
}

impl RedisTier {
    /// Sets up the connection without waiting for Redis: a gateway can
    /// start (and serve from the durable tier) while Redis is down.
    pub fn connect(url: &str, prefix: &str, timeout: Duration) -> StoreResult<RedisTier> {
        Self::connect_tls(url, prefix, timeout, &RedisTls::default())
    }

    /// [`RedisTier::connect`], with the CA and client certificate of a
    /// `rediss://` URL.
    pub fn connect_tls(
        url: &str,
        prefix: &str,
        timeout: Duration,
        tls: &RedisTls,
    ) -> StoreResult<RedisTier> {
        let address = redact_url(url);
        let invalid = |message: String| StoreError::Unavailable {
            tier: TIER,
            message: format!("{address}: {message}"),
        };
        if url.starts_with("rediss://") {
            // The redis crate builds its rustls configuration with the
            // process's default provider: make it ring, the only one built.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let client = if tls.is_empty() {
            redis::Client::open(url)
        } else {
            let certificates = tls.certificates().map_err(invalid)?;
            redis::Client::build_with_tls(url, certificates)
        }
        .map_err(|e| invalid(e.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            // Reconnection is retried by the hybrid store's recovery loop;
            // a request never waits on a long backoff here.
            .set_number_of_retries(1)
            .set_max_delay(timeout);
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|e| unavailable(&address, e))?;
        Ok(RedisTier {
            client,
            conn,
            refresh: redis::Script::new(REFRESH_SCRIPT),
            prefix: prefix.to_string(),
            channel: format!("{prefix}invalidate"),
            address,
            timeout,
        })
    }

    /// The pub/sub channel of local-cache invalidations.
    pub fn invalidation_channel(&self) -> &str {
        &self.channel
    }

    fn key(&self, hash: &TokenHash) -> String {
        let mut key = String::with_capacity(self.prefix.len() + 2 + 64);
        key.push_str(&self.prefix);
        key.push_str("s:");
        key.push_str(&hash.to_hex());
        key
    }

    /// `SET key record PXAT expiry [NX]`: a session record expiring with
    /// its session; with `only_if_absent`, nothing already there (a fresher
    /// record or a tombstone) is overwritten.
    async fn set(
        &self,
        key: &TokenHash,
        session: &Session,
        only_if_absent: bool,
    ) -> StoreResult<()> {
        if !session.is_live(now_ms()) {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.key(key))
            .arg(codec::encode(session))
            .arg("PXAT")
            .arg(session.expires_at);
        if only_if_absent {
            cmd.arg("NX");
        }
        cmd.query_async::<Option<String>>(&mut conn)
            .await
            .map_err(|e| unavailable(&self.address, e))?;
        Ok(())
    }

    /// The key a session hash is stored under (for tests and operators).
    pub fn key_for(&self, hash: &TokenHash) -> String {
        self.key(hash)
    }
}

#[async_trait]
impl FastTier for RedisTier {
    fn kind(&self) -> &'static str {
        TIER
    }

    async fn get(&self, key: &TokenHash) -> StoreResult<Cached> {
        let mut conn = self.conn.clone();
        let value: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.key(key))
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable(&self.address, e))?;
        match value {
            None => Ok(Cached::Miss),
            Some(bytes) if bytes == TOMBSTONE => Ok(Cached::Revoked),
            Some(bytes) => match codec::decode(&bytes) {
                Ok(session) => Ok(Cached::Live(Arc::new(session))),
                Err(e) => {
                    // A corrupt entry is a cache miss: the durable tier
                    // has the truth.
                    tracing::warn!(error = %e, "ignoring a corrupt fast-tier entry");
                    Ok(Cached::Miss)
                }
            },
        }
    }

    async fn put(&self, key: &TokenHash, session: Arc<Session>) -> StoreResult<()> {
        self.set(key, &session, false).await
    }

    async fn restore(&self, key: &TokenHash, session: Arc<Session>) -> StoreResult<()> {
        self.set(key, &session, true).await
    }

    async fn refresh(&self, key: &TokenHash, session: Arc<Session>) -> StoreResult<()> {
        if !session.is_live(now_ms()) {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        self.refresh
            .key(self.key(key))
            .arg(codec::encode(&session))
            .arg(session.expires_at)
            .invoke_async::<i64>(&mut conn)
            .await
            .map_err(|e| unavailable(&self.address, e))?;
        Ok(())
    }

    async fn revoke(&self, entries: &[(TokenHash, i64)]) -> StoreResult<()> {
        let now = now_ms();
        let mut conn = self.conn.clone();
        for chunk in entries.chunks(500) {
            let mut pipe = redis::pipe();
            for (key, until) in chunk {
                if *until > now {
                    pipe.cmd("SET")
                        .arg(self.key(key))
                        .arg(TOMBSTONE)
                        .arg("PXAT")
                        .arg(*until)
                        .ignore();
                } else {
                    pipe.cmd("DEL").arg(self.key(key)).ignore();
                }
            }
            pipe.query_async::<()>(&mut conn)
                .await
                .map_err(|e| unavailable(&self.address, e))?;
        }
        Ok(())
    }

    async fn remove(&self, keys: &[TokenHash]) -> StoreResult<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        // Bounded batches: a user with thousands of sessions does not
        // become one giant command.
        for chunk in keys.chunks(500) {
            let mut cmd = redis::cmd("DEL");
            for key in chunk {
                cmd.arg(self.key(key));
            }
            cmd.query_async::<()>(&mut conn)
                .await
                .map_err(|e| unavailable(&self.address, e))?;
        }
        Ok(())
    }

    async fn ping(&self) -> StoreResult<()> {
        let mut conn = self.conn.clone();
        redis::cmd("PING")
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| unavailable(&self.address, e))
    }

    async fn instance_id(&self) -> StoreResult<Option<String>> {
        let mut conn = self.conn.clone();
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable(&self.address, e))?;
        Ok(info
            .lines()
            .find_map(|l| l.strip_prefix("run_id:"))
            .map(|s| s.trim().to_string()))
    }

    async fn claim(&self, name: &str, owner: &str, ttl: Duration) -> StoreResult<bool> {
        let mut conn = self.conn.clone();
        let set: Option<String> = redis::cmd("SET")
            .arg(format!("{}{name}", self.prefix))
            .arg(owner)
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable(&self.address, e))?;
        Ok(set.is_some())
    }

    async fn mark(&self, name: &str, ttl: Duration) -> StoreResult<()> {
        let mut conn = self.conn.clone();
        redis::cmd("SET")
            .arg(format!("{}{name}", self.prefix))
            .arg(1)
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| unavailable(&self.address, e))
    }

    async fn marked(&self, name: &str) -> StoreResult<bool> {
        let mut conn = self.conn.clone();
        redis::cmd("EXISTS")
            .arg(format!("{}{name}", self.prefix))
            .query_async::<i64>(&mut conn)
            .await
            .map(|n| n > 0)
            .map_err(|e| unavailable(&self.address, e))
    }
}

#[async_trait]
impl InvalidationBus for RedisTier {
    async fn publish(&self, payload: Vec<u8>) -> StoreResult<()> {
        let mut conn = self.conn.clone();
        redis::cmd("PUBLISH")
            .arg(&self.channel)
            .arg(payload)
            .query_async::<i64>(&mut conn)
            .await
            .map_err(|e| unavailable(&self.address, e))?;
        Ok(())
    }

    async fn subscribe(&self) -> StoreResult<Box<dyn InvalidationFeed>> {
        let subscribe = async {
            let mut pubsub = self.client.get_async_pubsub().await?;
            pubsub.subscribe(&self.channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        // The client's own connect has no deadline of ours.
        let pubsub = tokio::time::timeout(self.timeout, subscribe)
            .await
            .map_err(|_| lost(&self.address, "subscribing timed out"))?
            .map_err(|e| unavailable(&self.address, e))?;
        let (sink, stream) = pubsub.split();
        let mut ping = tokio::time::interval_at(
            tokio::time::Instant::now() + SUBSCRIPTION_PING,
            SUBSCRIPTION_PING,
        );
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ok(Box::new(RedisFeed {
            sink,
            stream,
            ping,
            timeout: self.timeout,
            address: self.address.clone(),
        }))
    }
}

fn lost(address: &str, why: &str) -> StoreError {
    StoreError::Unavailable {
        tier: TIER,
        message: format!("{address}: {why}"),
    }
}

/// One subscription on its own connection; dropping it closes the
/// connection.
struct RedisFeed {
    sink: PubSubSink,
    stream: PubSubStream,
    ping: tokio::time::Interval,
    timeout: Duration,
    address: String,
}

#[async_trait]
impl InvalidationFeed for RedisFeed {
    async fn next(&mut self) -> StoreResult<Vec<u8>> {
        loop {
            tokio::select! {
                message = self.stream.next() => {
                    return match message {
                        Some(message) => Ok(message.get_payload_bytes().to_vec()),
                        None => Err(lost(&self.address, "the subscription's connection closed")),
                    };
                }
                _ = self.ping.tick() => {
                    // A connection cut without a reset delivers nothing and
                    // reports nothing: only an unanswered ping tells.
                    match tokio::time::timeout(self.timeout, self.sink.ping::<()>()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return Err(unavailable(&self.address, e)),
                        Err(_) => return Err(lost(&self.address, "the subscription's ping timed out")),
                    }
                }
            }
        }
    }
}
