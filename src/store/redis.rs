//! The Redis fast tier: one Redis server, or a Redis Cluster.
//!
//! One key per session, `<prefix>s:<hex of the token hash>`, holding the
//! compact encoding of [`super::codec`], with the Redis expiry set to the
//! session's own (`PXAT`), so Redis drops what has expired by itself. A
//! revoked session's key holds a one-byte tombstone until the session
//! would have expired: a restore (`SET NX`) or an activity refresh (a
//! script that writes only over a live session) racing with the
//! revocation cannot bring it back, and every instance reading the key
//! learns of the revocation without asking the durable tier. Every command
//! on the request path touches exactly one key, so no key needs a hash tag
//! in a cluster; every command is bounded by `store.redis_timeout_ms`,
//! whatever the client's own retries and redirections.
//!
//! One server (`store.redis_url`): the connection manager multiplexes all
//! requests over one connection (pipelining them) and reconnects by
//! itself. A cluster (`store.redis_cluster_urls`, the seed nodes): the
//! cluster client keeps a connection per node, follows `MOVED`/`ASK`, and
//! learns the new topology after a failover or a reshard. The commands are
//! the same in both; only these differ:
//!
//! * revocations and removals are sent in batches of one hash slot each
//!   (a multi-key command or a pipeline across slots is refused), several
//!   batches at a time;
//! * the restart fingerprint ([`FastTier::instance_id`]) is taken over
//!   every primary: a failover that promotes a replica (which may have
//!   missed the last tombstones, replication being asynchronous) changes
//!   it, and the hybrid store replays the revocation log;
//! * a publication goes to any node (classic pub/sub reaches the
//!   subscribers of every node; sharded pub/sub is not used: a slot
//!   migration drops its subscribers).
//!
//! It is also the [`InvalidationBus`] of the in-process cache in front of
//! it ([`super::layered`]): messages are published on the channel
//! `<prefix>invalidate`, and each subscriber holds one dedicated pub/sub
//! connection to one node (the server; on a cluster each seed in turn,
//! then the other nodes it knows of). A
//! subscription proves itself end to end: it also subscribes to a channel
//! of its own, `<prefix>invalidate:heartbeat:<random nonce>`, publishes a
//! heartbeat there every [`HEARTBEAT_INTERVAL`] (through the command
//! connection: on a cluster, any node) and expects each back within
//! [`HEARTBEAT_INTERVAL`] twice (or twice the Redis timeout if longer), so
//! a connection that died silently (a partition), a node that was lost or
//! a cluster bus that stopped carrying messages is noticed, and the
//! layered tier drops its cache and subscribes again (elsewhere). A
//! channel per subscription: no instance receives another's heartbeats
//! (N instances cost N messages a second, not N²), and an instance of an
//! older version, which reads every message on `<prefix>invalidate` as a
//! batch of hashes, never sees one.
//!
//! With `rediss://` URLs both the command connections and every pub/sub
//! connection go over TLS (rustls), verifying the server's certificate
//! and name against [`RedisTls::ca_file`] or the system roots, and
//! presenting the client certificate when one is configured.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSubSink, PubSubStream};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo, SingleNodeRoutingInfo, Slot};

use super::layered::{InvalidationBus, InvalidationFeed};
use super::{Cached, FastTier, StoreError, StoreResult, codec};
use crate::config::redact_url;
use crate::session::{Session, now_ms};
use crate::token::TokenHash;

const TIER: &str = "redis";
/// The value of a revoked session's key; session records start with 1.
const TOMBSTONE: &[u8] = &[0];
/// How often a subscription publishes its heartbeat.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// Most keys in one revocation or removal batch.
const BATCH: usize = 500;
/// Batches of one revocation in flight at once (a cluster has a batch per
/// hash slot: a user's sessions are spread over many).
const BATCHES_IN_FLIGHT: usize = 16;
/// Nodes beyond the seeds tried for a subscription.
const MAX_OTHER_NODES: usize = 16;
/// Heartbeat deadlines a subscription may go without any heartbeat back
/// (some could not be published) before it is given up.
const UNPROVEN_LIMIT: u32 = 3;
/// How often a cluster connection may be made afresh.
const RENEW_AT_MOST_EVERY: Duration = Duration::from_secs(1);
/// Attempts at a publication, each on a node picked at random in a
/// cluster (one may be down); within one Redis timeout in all.
const PUBLISH_ATTEMPTS: usize = 2;

/// Overwrites a key only while it holds a live session record.
const REFRESH_SCRIPT: &str = r"
local v = redis.call('GET', KEYS[1])
if v and string.byte(v, 1) == 1 then
  redis.call('SET', KEYS[1], ARGV[1], 'PXAT', ARGV[2])
  return 1
end
return 0
";

/// The command connection.
#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for Connection {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

/// Runs commands on the command connection, each bounded by the timeout.
/// Cheap to clone, and the clones share the connection (the subscriptions
/// hold one to publish their heartbeats).
#[derive(Clone)]
struct Commands {
    conn: Arc<ArcSwap<Connection>>,
    /// A cluster's client, to connect afresh ([`Commands::renew`]).
    cluster: Option<Arc<Renewal>>,
    address: String,
    timeout: Duration,
}

/// What [`Commands::renew`] needs.
struct Renewal {
    client: redis::cluster::ClusterClient,
    last: std::sync::Mutex<Option<tokio::time::Instant>>,
}

fn timed_out() -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "no answer within store.redis_timeout_ms",
    ))
}

impl Commands {
    fn conn(&self) -> Connection {
        Connection::clone(&self.conn.load())
    }

    /// A cluster connection made afresh, its topology read again from the
    /// seeds, at most once per [`RENEW_AT_MOST_EVERY`]. The cluster client
    /// learns a new topology from `MOVED` answers, and a command for a
    /// failed primary's slots is served by its promoted replica without
    /// one: a client that sent nothing else keeps the old primary in its
    /// map, and the commands sent to every primary (the fingerprint, the
    /// health check) keep failing. Commands under way finish on the old
    /// connection.
    fn renew(&self) {
        let Some(renewal) = &self.cluster else {
            return;
        };
        {
            let mut last = renewal.last.lock().expect("renewal lock");
            let now = tokio::time::Instant::now();
            if last.is_some_and(|at| now.duration_since(at) < RENEW_AT_MOST_EVERY) {
                return;
            }
            *last = Some(now);
        }
        tracing::info!(address = %self.address, "reconnecting to the Redis Cluster");
        let conn = renewal
            .client
            .get_pending_async_connection_with_config(redis::cluster::ClusterConfig::new());
        self.conn.store(Arc::new(Connection::Cluster(conn)));
    }

    /// One command, routed by its key (a keyless one: anywhere).
    async fn run<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        let mut conn = self.conn();
        tokio::time::timeout(self.timeout, cmd.query_async(&mut conn))
            .await
            .unwrap_or_else(|_| Err(timed_out()))
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> StoreResult<T> {
        self.run(cmd)
            .await
            .map_err(|e| unavailable(&self.address, e))
    }

    /// A pipeline whose keys are all in one hash slot.
    async fn pipeline(&self, pipe: &redis::Pipeline) -> StoreResult<()> {
        let mut conn = self.conn();
        tokio::time::timeout(self.timeout, pipe.query_async::<()>(&mut conn))
            .await
            .unwrap_or_else(|_| Err(timed_out()))
            .map_err(|e| unavailable(&self.address, e))
    }

    /// `PUBLISH`: on a cluster, on a primary picked at random (classic
    /// pub/sub reaches the subscribers of every node), and another one if
    /// the first fails; each attempt has its share of the timeout, so
    /// that a node that does not answer does not use it all.
    async fn publish(&self, channel: &str, payload: &[u8]) -> StoreResult<()> {
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(channel).arg(payload);
        let Connection::Cluster(mut conn) = self.conn() else {
            return self.query::<i64>(&cmd).await.map(drop);
        };
        let mut last = None;
        for _ in 0..PUBLISH_ATTEMPTS {
            let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary);
            let attempt = conn.route_command(cmd.clone(), routing);
            match tokio::time::timeout(self.timeout / PUBLISH_ATTEMPTS as u32, attempt).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => last = Some(e),
                Err(_) => last = Some(timed_out()),
            }
        }
        Err(unavailable(&self.address, last.unwrap_or_else(timed_out)))
    }
}

/// Takes (or renews) a claim unless another owner holds it.
const CLAIM_SCRIPT: &str = r"
local v = redis.call('GET', KEYS[1])
if v == false or v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
";

pub struct RedisTier {
    commands: Commands,
    /// Where a subscription is made: the server, or each seed in turn.
    nodes: Vec<redis::Client>,
    next_node: AtomicUsize,
    refresh: redis::Script,
    prefix: String,
    channel: String,
    /// Each subscription's heartbeat channel is this and its nonce.
    heartbeat_prefix: String,
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
        let client = node_client(url, tls).map_err(|m| invalid(&address, m))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            // Reconnection is retried by the hybrid store's recovery loop;
            // a request never waits on a long backoff here.
            .set_number_of_retries(1)
            .set_max_delay(timeout);
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|e| unavailable(&address, e))?;
        Ok(Self::new(
            Connection::Single(conn),
            None,
            vec![client],
            address,
            prefix,
            timeout,
        ))
    }

    /// A Redis Cluster, found through its seed nodes (`redis://` or
    /// `rediss://` alike, with the TLS files of [`RedisTls`]). Like
    /// [`RedisTier::connect`], does not wait for the cluster.
    pub fn connect_cluster(
        seeds: &[String],
        prefix: &str,
        timeout: Duration,
        tls: &RedisTls,
    ) -> StoreResult<RedisTier> {
        let address = seeds
            .iter()
            .map(|u| redact_url(u))
            .collect::<Vec<_>>()
            .join(",");
        if seeds.is_empty() {
            return Err(invalid(&address, "no seed node".into()));
        }
        let nodes = seeds
            .iter()
            .map(|url| node_client(url, tls))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|m| invalid(&address, m))?;
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let mut builder =
            redis::cluster::ClusterClientBuilder::new(seeds.iter().map(String::as_str))
                .connection_timeout(timeout)
                .response_timeout(timeout)
                // Redirections (MOVED/ASK after a failover or a reshard) and
                // reconnections are retried within one Redis timeout in all;
                // beyond it the request is served from the durable tier.
                .overall_response_timeout(Some(timeout))
                .retries(3)
                .min_retry_wait(1)
                .max_retry_wait((timeout_ms / 4).max(1));
        if !tls.is_empty() {
            builder = builder.certs(tls.certificates().map_err(|m| invalid(&address, m))?);
        }
        let client = builder.build().map_err(|e| unavailable(&address, e))?;
        let conn =
            client.get_pending_async_connection_with_config(redis::cluster::ClusterConfig::new());
        Ok(Self::new(
            Connection::Cluster(conn),
            Some(client),
            nodes,
            address,
            prefix,
            timeout,
        ))
    }

    fn new(
        conn: Connection,
        cluster: Option<redis::cluster::ClusterClient>,
        nodes: Vec<redis::Client>,
        address: String,
        prefix: &str,
        timeout: Duration,
    ) -> RedisTier {
        RedisTier {
            commands: Commands {
                conn: Arc::new(ArcSwap::from_pointee(conn)),
                cluster: cluster.map(|client| {
                    Arc::new(Renewal {
                        client,
                        last: std::sync::Mutex::new(None),
                    })
                }),
                address,
                timeout,
            },
            nodes,
            next_node: AtomicUsize::new(0),
            refresh: redis::Script::new(REFRESH_SCRIPT),
            prefix: prefix.to_string(),
            channel: format!("{prefix}invalidate"),
            heartbeat_prefix: format!("{prefix}invalidate:heartbeat:"),
        }
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
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.key(key))
            .arg(codec::encode(session))
            .arg("PXAT")
            .arg(session.expires_at);
        if only_if_absent {
            cmd.arg("NX");
        }
        self.commands.query::<Option<String>>(&cmd).await?;
        Ok(())
    }

    /// The key a session hash is stored under (for tests and operators).
    pub fn key_for(&self, hash: &TokenHash) -> String {
        self.key(hash)
    }

    /// `items`' keys in batches of at most [`BATCH`], each within one hash
    /// slot on a cluster.
    fn batches<'a, T>(
        &self,
        items: &'a [T],
        hash: impl Fn(&T) -> &TokenHash,
    ) -> Vec<Vec<(String, &'a T)>> {
        let keyed = items.iter().map(|item| (self.key(hash(item)), item));
        let groups: Vec<Vec<(String, &T)>> = match self.commands.cluster {
            None => vec![keyed.collect()],
            Some(_) => {
                let mut by_slot: HashMap<Slot, Vec<(String, &T)>> = HashMap::new();
                for (key, item) in keyed {
                    by_slot
                        .entry(Slot::for_key(key.as_bytes()))
                        .or_default()
                        .push((key, item));
                }
                by_slot.into_values().collect()
            }
        };
        let mut out = Vec::new();
        for mut group in groups {
            while group.len() > BATCH {
                let rest = group.split_off(BATCH);
                out.push(std::mem::replace(&mut group, rest));
            }
            if !group.is_empty() {
                out.push(group);
            }
        }
        out
    }

    /// Runs the pipelines, [`BATCHES_IN_FLIGHT`] at a time; the first
    /// error fails the whole (every write here is safe to repeat).
    async fn run_batches(&self, pipes: Vec<redis::Pipeline>) -> StoreResult<()> {
        let mut results = futures_util::stream::iter(pipes)
            .map(|pipe| async move { self.commands.pipeline(&pipe).await })
            .buffer_unordered(BATCHES_IN_FLIGHT);
        while let Some(result) = results.next().await {
            result?;
        }
        Ok(())
    }

    /// The fingerprint of a cluster: every primary's `run_id`, sorted (a
    /// promoted replica brings its own), read from the nodes the client
    /// routes to as primaries. If one of them says it is a replica, or
    /// they are fewer than the primaries the cluster counts (`CLUSTER
    /// INFO`'s `cluster_size`: the client skips a node it lost), the
    /// client's map is out of date (a failover it has not heard of): the
    /// connection is made afresh and asked once more, so that every
    /// instance settles on the same fingerprint, the cluster's.
    async fn cluster_fingerprint(&self) -> redis::RedisResult<String> {
        for attempt in 0..2 {
            let Connection::Cluster(conn) = self.commands.conn() else {
                unreachable!("a cluster's connection");
            };
            let answers = match self.primaries_info(conn).await {
                Ok((answers, size)) if answers.len() != size => {
                    if attempt == 0 {
                        self.commands.renew();
                    }
                    continue;
                }
                Ok((answers, _)) => answers,
                Err(e) => {
                    // Perhaps a primary the client still routes to is
                    // gone (see `Commands::renew`).
                    self.commands.renew();
                    return Err(e);
                }
            };
            let field = |info: &str, name: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map_or(String::new(), |v| v.trim().to_string())
            };
            if answers
                .values()
                .all(|info| field(info, "role:") == "master")
            {
                let mut ids: Vec<String> = answers
                    .values()
                    .map(|info| field(info, "run_id:"))
                    .collect();
                ids.sort();
                return Ok(ids.join(","));
            }
            if attempt == 0 {
                self.commands.renew();
            }
        }
        Err(redis::RedisError::from(std::io::Error::other(
            "the cluster's primaries changed (a failover); reading them again",
        )))
    }

    /// `INFO server replication` of every primary the client knows, by
    /// address, and how many primaries the cluster counts.
    async fn primaries_info(
        &self,
        mut conn: ClusterConnection,
    ) -> redis::RedisResult<(BTreeMap<String, String>, usize)> {
        let mut info = redis::cmd("INFO");
        info.arg("server").arg("replication");
        let all = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
        let mut cluster_info = redis::cmd("CLUSTER");
        cluster_info.arg("INFO");
        let any = RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary);
        let both = async {
            let answers = conn.clone().route_command(info, all).await?;
            let cluster_info: String =
                redis::from_redis_value(conn.route_command(cluster_info, any).await?)?;
            let size = cluster_info
                .lines()
                .find_map(|l| l.strip_prefix("cluster_size:"))
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or(0);
            Ok((redis::from_redis_value(answers)?, size))
        };
        tokio::time::timeout(self.commands.timeout, both)
            .await
            .unwrap_or_else(|_| Err(timed_out()))
    }

    /// A pub/sub connection to one node, subscribed to both channels:
    /// the seeds in turn, starting after the last one used, then (all
    /// seeds lost) the other nodes the cluster knows of.
    async fn subscribe_somewhere(&self, heartbeat: &str) -> StoreResult<redis::aio::PubSub> {
        let n = self.nodes.len();
        let first = self.next_node.fetch_add(1, Ordering::Relaxed);
        let mut last_error = None;
        for i in 0..n {
            match self
                .subscribe_on(&self.nodes[(first + i) % n], heartbeat)
                .await
            {
                Ok(pubsub) => return Ok(pubsub),
                Err(e) => last_error = Some(e),
            }
        }
        for client in self.other_nodes().await {
            match self.subscribe_on(&client, heartbeat).await {
                Ok(pubsub) => return Ok(pubsub),
                Err(e) => last_error = Some(e),
            }
        }
        Err(unavailable(
            &self.commands.address,
            last_error.unwrap_or_else(timed_out),
        ))
    }

    async fn subscribe_on(
        &self,
        client: &redis::Client,
        heartbeat: &str,
    ) -> redis::RedisResult<redis::aio::PubSub> {
        let subscribe = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub
                .subscribe(&[self.channel.as_str(), heartbeat])
                .await?;
            Ok(pubsub)
        };
        // The client's own connect has no deadline of ours.
        tokio::time::timeout(self.commands.timeout, subscribe)
            .await
            .unwrap_or_else(|_| Err(timed_out()))
    }

    /// The cluster's nodes that are not seeds and not failed (`CLUSTER
    /// NODES` on any node), at most [`MAX_OTHER_NODES`], reached like the
    /// first seed (its TLS and credentials); none on a single server or
    /// when no node answers.
    async fn other_nodes(&self) -> Vec<redis::Client> {
        let (Some(_), Some(seed)) = (&self.commands.cluster, self.nodes.first()) else {
            return Vec::new();
        };
        let nodes: String = match self
            .commands
            .query(redis::cmd("CLUSTER").arg("NODES"))
            .await
        {
            Ok(text) => text,
            Err(e) => {
                tracing::debug!(error = %e, "CLUSTER NODES failed; no other node to subscribe on");
                return Vec::new();
            }
        };
        let seeds: Vec<(String, u16)> = self
            .nodes
            .iter()
            .filter_map(|c| match c.get_connection_info().addr() {
                redis::ConnectionAddr::Tcp(host, port)
                | redis::ConnectionAddr::TcpTls { host, port, .. } => Some((host.clone(), *port)),
                _ => None,
            })
            .collect();
        cluster_node_addresses(&nodes)
            .into_iter()
            .filter(|address| !seeds.contains(address))
            .take(MAX_OTHER_NODES)
            .filter_map(|(host, port)| {
                let addr = match seed.get_connection_info().addr() {
                    redis::ConnectionAddr::TcpTls {
                        insecure,
                        tls_params,
                        ..
                    } => redis::ConnectionAddr::TcpTls {
                        host,
                        port,
                        insecure: *insecure,
                        tls_params: tls_params.clone(),
                    },
                    _ => redis::ConnectionAddr::Tcp(host, port),
                };
                redis::Client::open(seed.get_connection_info().clone().set_addr(addr)).ok()
            })
            .collect()
    }
}

/// The addresses of the nodes in `CLUSTER NODES` output that are not
/// failed (or still joining).
fn cluster_node_addresses(nodes: &str) -> Vec<(String, u16)> {
    nodes
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (address, flags) = (fields.get(1)?, fields.get(2)?);
            if ["fail", "handshake", "noaddr"]
                .iter()
                .any(|bad| flags.contains(bad))
            {
                return None;
            }
            // ip:port@cport[,hostname]
            let (host, rest) = address.rsplit_once('@')?.0.rsplit_once(':')?;
            Some((host.to_string(), rest.parse().ok()?))
        })
        .collect()
}

fn invalid(address: &str, message: String) -> StoreError {
    StoreError::Unavailable {
        tier: TIER,
        message: format!("{address}: {message}"),
    }
}

/// A client of one node (the pub/sub connections, and the standalone
/// command connection).
fn node_client(url: &str, tls: &RedisTls) -> Result<redis::Client, String> {
    if url.starts_with("rediss://") {
        // The redis crate builds its rustls configuration with the
        // process's default provider: make it ring, the only one built.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    if tls.is_empty() {
        redis::Client::open(url)
    } else {
        redis::Client::build_with_tls(url, tls.certificates()?)
    }
    .map_err(|e| e.to_string())
}

#[async_trait]
impl FastTier for RedisTier {
    fn kind(&self) -> &'static str {
        TIER
    }

    async fn get(&self, key: &TokenHash) -> StoreResult<Cached> {
        let value: Option<Vec<u8>> = self
            .commands
            .query(redis::cmd("GET").arg(self.key(key)))
            .await?;
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
        let key = self.key(key);
        let record = codec::encode(&session);
        // EVALSHA, and EVAL where the node does not know the script (a
        // restarted or newly promoted node): both are routed by the one
        // key, where `SCRIPT LOAD` would go to every node of a cluster.
        let call = |command: &str, script: &str| {
            let mut cmd = redis::cmd(command);
            cmd.arg(script)
                .arg(1)
                .arg(&key)
                .arg(&record)
                .arg(session.expires_at);
            cmd
        };
        let result = match self
            .commands
            .run::<i64>(&call("EVALSHA", self.refresh.get_hash()))
            .await
        {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                self.commands
                    .run::<i64>(&call("EVAL", REFRESH_SCRIPT))
                    .await
            }
            other => other,
        };
        result.map_err(|e| unavailable(&self.commands.address, e))?;
        Ok(())
    }

    async fn revoke(&self, entries: &[(TokenHash, i64)]) -> StoreResult<()> {
        let now = now_ms();
        let pipes = self
            .batches(entries, |(key, _)| key)
            .into_iter()
            .map(|batch| {
                let mut pipe = redis::pipe();
                for (key, (_, until)) in batch {
                    if *until > now {
                        pipe.cmd("SET")
                            .arg(key)
                            .arg(TOMBSTONE)
                            .arg("PXAT")
                            .arg(*until)
                            .ignore();
                    } else {
                        pipe.cmd("DEL").arg(key).ignore();
                    }
                }
                pipe
            })
            .collect();
        self.run_batches(pipes).await
    }

    async fn remove(&self, keys: &[TokenHash]) -> StoreResult<()> {
        // Bounded batches: a user with thousands of sessions does not
        // become one giant command.
        let pipes = self
            .batches(keys, |key| key)
            .into_iter()
            .map(|batch| {
                let mut pipe = redis::pipe();
                let del = pipe.cmd("DEL");
                for (key, _) in batch {
                    del.arg(key);
                }
                del.ignore();
                pipe
            })
            .collect();
        self.run_batches(pipes).await
    }

    async fn ping(&self) -> StoreResult<()> {
        // On a cluster, every primary answers.
        self.commands.query(&redis::cmd("PING")).await
    }

    async fn instance_id(&self) -> StoreResult<Option<String>> {
        let info: String = match self.commands.conn() {
            Connection::Single(_) => {
                self.commands
                    .query(redis::cmd("INFO").arg("server"))
                    .await?
            }
            Connection::Cluster(_) => {
                return self
                    .cluster_fingerprint()
                    .await
                    .map(Some)
                    .map_err(|e| unavailable(&self.commands.address, e));
            }
        };
        Ok(info
            .lines()
            .find_map(|l| l.strip_prefix("run_id:"))
            .map(|s| s.trim().to_string()))
    }

    async fn claim(&self, name: &str, owner: &str, ttl: Duration) -> StoreResult<bool> {
        // Plain EVAL: a claim is made once per recovery, not per request.
        let held: i64 = self
            .commands
            .query(
                redis::cmd("EVAL")
                    .arg(CLAIM_SCRIPT)
                    .arg(1)
                    .arg(format!("{}{name}", self.prefix))
                    .arg(owner)
                    .arg(ttl.as_millis() as u64),
            )
            .await?;
        Ok(held == 1)
    }

    async fn mark(&self, name: &str, ttl: Duration) -> StoreResult<()> {
        self.commands
            .query(
                redis::cmd("SET")
                    .arg(format!("{}{name}", self.prefix))
                    .arg(1)
                    .arg("PX")
                    .arg(ttl.as_millis() as u64),
            )
            .await
    }

    async fn marked(&self, name: &str) -> StoreResult<bool> {
        let n: i64 = self
            .commands
            .query(redis::cmd("EXISTS").arg(format!("{}{name}", self.prefix)))
            .await?;
        Ok(n > 0)
    }
}

#[async_trait]
impl InvalidationBus for RedisTier {
    async fn publish(&self, payload: Vec<u8>) -> StoreResult<()> {
        self.commands.publish(&self.channel, &payload).await
    }

    async fn subscribe(&self) -> StoreResult<Box<dyn InvalidationFeed>> {
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce).map_err(|e| invalid(&self.commands.address, e.to_string()))?;
        let heartbeat_channel = format!("{}{}", self.heartbeat_prefix, hex(&nonce));
        let pubsub = self.subscribe_somewhere(&heartbeat_channel).await?;
        let (sink, stream) = pubsub.split();
        let mut beat = tokio::time::interval(HEARTBEAT_INTERVAL);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ok(Box::new(RedisFeed {
            _sink: sink,
            stream,
            commands: self.commands.clone(),
            channel: self.channel.clone(),
            heartbeat_channel,
            sent: 0,
            outstanding: BTreeMap::new(),
            proven_at: tokio::time::Instant::now(),
            beat,
            deadline: HEARTBEAT_INTERVAL.max(self.commands.timeout) * 2,
        }))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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
    /// Kept so that the connection stays open.
    _sink: PubSubSink,
    stream: PubSubStream,
    commands: Commands,
    channel: String,
    /// This subscription's own (its nonce in the name).
    heartbeat_channel: String,
    sent: u64,
    /// Heartbeats published and not yet back, by number, with when they
    /// were published. At most `deadline / HEARTBEAT_INTERVAL + 1`.
    outstanding: BTreeMap<u64, tokio::time::Instant>,
    /// When a heartbeat last came back (or the subscription was made).
    proven_at: tokio::time::Instant,
    beat: tokio::time::Interval,
    deadline: Duration,
}

impl RedisFeed {
    /// A heartbeat came in: it is back.
    fn heard(&mut self, payload: &[u8]) {
        if let Some(n) = std::str::from_utf8(payload)
            .ok()
            .and_then(|n| n.parse::<u64>().ok())
            && self.outstanding.remove(&n).is_some()
        {
            self.proven_at = tokio::time::Instant::now();
        }
    }

    /// Publishes the next heartbeat.
    async fn beat(&mut self) {
        self.sent += 1;
        let heartbeat = self.sent.to_string();
        let sent_at = tokio::time::Instant::now();
        match self
            .commands
            .publish(&self.heartbeat_channel, heartbeat.as_bytes())
            .await
        {
            Ok(()) => {
                self.outstanding.insert(self.sent, sent_at);
            }
            // A heartbeat that could not be sent proves nothing about the
            // subscription (a node of the command connection is down, or
            // the whole fast tier: the hybrid store's to handle); only
            // when none has come back for [`UNPROVEN_LIMIT`] deadlines is
            // the subscription given up.
            Err(e) => tracing::debug!(error = %e, "could not publish a subscription heartbeat"),
        }
    }

    /// When the subscription is given up unless a heartbeat comes back.
    fn due(&self) -> tokio::time::Instant {
        let unproven = self.proven_at + self.deadline * UNPROVEN_LIMIT;
        match self.outstanding.first_key_value() {
            Some((_, sent_at)) => unproven.min(*sent_at + self.deadline),
            None => unproven,
        }
    }
}

#[async_trait]
impl InvalidationFeed for RedisFeed {
    async fn next(&mut self) -> StoreResult<Vec<u8>> {
        loop {
            let due = self.due();
            tokio::select! {
                message = self.stream.next() => {
                    let Some(message) = message else {
                        return Err(lost(&self.commands.address, "the subscription's connection closed"));
                    };
                    let channel = message.get_channel_name();
                    if channel == self.channel {
                        return Ok(message.get_payload_bytes().to_vec());
                    }
                    if channel == self.heartbeat_channel {
                        // Never handed on: not a batch of hashes.
                        self.heard(message.get_payload_bytes());
                    }
                }
                _ = self.beat.tick() => self.beat().await,
                // A connection cut without a reset delivers nothing and
                // reports nothing; a node lost, or a cluster bus that no
                // longer carries messages, neither: only a heartbeat that
                // does not come back tells.
                () = tokio::time::sleep_until(due) => {
                    return Err(lost(
                        &self.commands.address,
                        &format!(
                            "the subscription's heartbeat did not come back within {} ms",
                            self.deadline.as_millis()
                        ),
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_nodes_output_gives_the_live_nodes_addresses() {
        let nodes = "\
07c3 127.0.0.1:30004@31004 slave e7d1 0 1426238317239 4 connected
67ed 127.0.0.1:30002@31002,node-b master - 0 1426238316232 2 connected 5461-10922
292f 127.0.0.1:30003@31003 master,fail - 0 1426238318243 3 connected 10923-16383
6ec2 127.0.0.1:30005@31005 myself,master - 0 0 5 connected
e7d1 :0@0 master,noaddr - 0 0 0 disconnected
824f ::1:30006@31006 slave,fail? 292f 0 1426238317741 6 connected
";
        assert_eq!(
            cluster_node_addresses(nodes),
            vec![
                ("127.0.0.1".to_string(), 30004),
                ("127.0.0.1".to_string(), 30002),
                ("127.0.0.1".to_string(), 30005),
            ]
        );
        assert!(cluster_node_addresses("").is_empty());
        assert!(cluster_node_addresses("garbage\nmore garbage here x").is_empty());
    }
}
