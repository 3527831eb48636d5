//! The connections to Redis, whichever way it is deployed: one server, a
//! Redis Cluster (every command routed by slot, `MOVED`/`ASK` followed by
//! redis-rs's cluster client), or a primary found through Sentinels (asked
//! again every second and after failures, so a failover is followed without
//! a restart).
//!
//! Everything above this module sends commands through [`Commands`] and
//! subscribes through a [`Subscriber`]; only here do the three differ.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::future::join_all;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo};
use redis::sentinel::{SentinelClient, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Cmd, FromRedisValue, IntoConnectionInfo, Pipeline, ProtocolVersion,
    PushInfo, RedisResult, Value,
};
use tokio::sync::mpsc;

use super::RedisSetupError;
use crate::config::RedisDeployment;

/// Where commands go.
#[derive(Clone)]
pub(super) enum Commands {
    Single(ConnectionManager),
    Cluster(Arc<ClusterCommands>),
    Sentinel(Arc<SentinelPrimary>),
}

/// A Redis Cluster's commands connection: opened on first use (it needs the
/// topology, which an unreachable cluster cannot give; until then commands
/// fail, which is degraded mode, as with one unreachable server).
pub(super) struct ClusterCommands {
    client: ClusterClient,
    connection: tokio::sync::OnceCell<ClusterConnection>,
}

impl ClusterCommands {
    async fn connection(&self) -> RedisResult<ClusterConnection> {
        self.connection
            .get_or_try_init(|| self.client.get_async_connection())
            .await
            .cloned()
    }
}

/// The primary the Sentinels name, and a connection to it.
pub(super) struct SentinelPrimary {
    sentinels: tokio::sync::Mutex<SentinelClient>,
    /// The primary's address and a connection to it; replaced on failover.
    current: RwLock<Option<(String, ConnectionManager)>>,
    timeout: Duration,
}

/// How the instance's pub/sub connection is opened again after a failure.
pub(super) enum Subscriber {
    Single(redis::Client),
    Cluster(Vec<String>, Duration),
    Sentinel(Arc<SentinelPrimary>),
}

/// One open pub/sub connection: plain channels, or, in a cluster, sharded
/// channels (`SSUBSCRIBE`), which reach subscribers of their slot's shard
/// wherever the message was published.
pub(super) enum Subscription {
    Plain(MultiplexedConnection),
    Sharded(ClusterConnection),
}

fn manager_config(timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_response_timeout(Some(timeout))
        .set_connection_timeout(Some(timeout))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500))
}

fn setup_error(err: impl std::fmt::Display) -> RedisSetupError {
    RedisSetupError(err.to_string())
}

/// Opens the commands connection and the subscriber of `deployment`,
/// without waiting for Redis (an unreachable one is degraded mode, not an
/// error). Returns them and the database number (for keyspace channels).
pub(super) fn open(
    deployment: &RedisDeployment,
    timeout: Duration,
) -> Result<(Commands, Subscriber, i64), RedisSetupError> {
    match deployment {
        RedisDeployment::Single { url } => {
            let info = url
                .as_str()
                .into_connection_info()
                .map_err(|err| setup_error(format!("not a usable Redis URL: {err}")))?;
            let db = info.redis_settings().db();
            let commands = ConnectionManager::new_lazy_with_config(
                redis::Client::open(info.clone()).map_err(setup_error)?,
                manager_config(timeout),
            )
            .map_err(setup_error)?;
            let resp3 = info
                .redis_settings()
                .clone()
                .set_protocol(ProtocolVersion::RESP3);
            let subscriber =
                redis::Client::open(info.set_redis_settings(resp3)).map_err(setup_error)?;
            Ok((
                Commands::Single(commands),
                Subscriber::Single(subscriber),
                db,
            ))
        }
        RedisDeployment::Cluster { nodes } => Ok((
            Commands::Cluster(Arc::new(ClusterCommands {
                client: cluster_client(nodes, timeout, None)?,
                connection: tokio::sync::OnceCell::new(),
            })),
            Subscriber::Cluster(nodes.clone(), timeout),
            0,
        )),
        RedisDeployment::Sentinel { nodes, master } => {
            let client = SentinelClient::build(
                nodes.clone(),
                master.clone(),
                None,
                SentinelServerType::Master,
            )
            .map_err(setup_error)?;
            let primary = Arc::new(SentinelPrimary {
                sentinels: tokio::sync::Mutex::new(client),
                current: RwLock::new(None),
                timeout,
            });
            Ok((
                Commands::Sentinel(Arc::clone(&primary)),
                Subscriber::Sentinel(primary),
                0,
            ))
        }
    }
}

/// What a cluster's `cluster-node-timeout` is when it cannot be read (Redis's
/// default).
const DEFAULT_NODE_TIMEOUT: Duration = Duration::from_secs(15);

/// On a cluster, about the longest a failover takes: a primary is failed
/// after `cluster-node-timeout`, its replica elected within about as long
/// again, and meanwhile the cluster answers `CLUSTERDOWN`. `None` elsewhere.
pub(super) async fn failover_time(deployment: &RedisDeployment) -> Option<Duration> {
    let RedisDeployment::Cluster { nodes } = deployment else {
        return None;
    };
    let node_timeout = match cluster_node_timeout(nodes).await {
        Some(timeout) => timeout,
        None => {
            tracing::warn!(
                "could not read the cluster's cluster-node-timeout; assuming Redis's default of 15 s (set REDIS_DOWN_AFTER_MS to choose)"
            );
            DEFAULT_NODE_TIMEOUT
        }
    };
    Some(node_timeout * 2 + Duration::from_secs(1))
}

/// `CONFIG GET cluster-node-timeout` of the first seed that answers.
async fn cluster_node_timeout(nodes: &[String]) -> Option<Duration> {
    for node in nodes {
        let ask = async {
            let client = redis::Client::open(node.as_str()).ok()?;
            let mut conn = client.get_multiplexed_async_connection().await.ok()?;
            let reply: Vec<String> = redis::cmd("CONFIG")
                .arg("GET")
                .arg("cluster-node-timeout")
                .query_async(&mut conn)
                .await
                .ok()?;
            reply.get(1)?.parse::<u64>().ok()
        };
        if let Ok(Some(ms)) = tokio::time::timeout(Duration::from_secs(1), ask).await {
            return Some(Duration::from_millis(ms));
        }
    }
    None
}

/// Every node of a cluster, the first answer wins.
fn any_node() -> RoutingInfo {
    RoutingInfo::MultiNode((
        MultipleNodeRoutingInfo::AllNodes,
        Some(ResponsePolicy::OneSucceeded),
    ))
}

fn cluster_client(
    nodes: &[String],
    timeout: Duration,
    pushes: Option<mpsc::UnboundedSender<PushInfo>>,
) -> Result<ClusterClient, RedisSetupError> {
    let mut builder = ClusterClient::builder(nodes.to_vec())
        .connection_timeout(timeout)
        .response_timeout(timeout)
        .retries(3)
        // redis-rs waits 1.28 s and more before retrying TRYAGAIN,
        // CLUSTERDOWN or LOADING: longer than a lock's renewal period. Short
        // waits here; the request's own deadline (`Link::persist`) decides
        // how long to go on.
        .min_retry_wait(10)
        .max_retry_wait(250)
        .retry_wait_formula(25, 2);
    if let Some(pushes) = pushes {
        builder = builder
            .use_protocol(ProtocolVersion::RESP3)
            .push_sender(pushes);
    }
    builder.build().map_err(setup_error)
}

impl SentinelPrimary {
    /// The connection to the primary, once one is known.
    fn connection(&self) -> RedisResult<ConnectionManager> {
        let current = self.current.read().unwrap_or_else(|p| p.into_inner());
        current
            .as_ref()
            .map(|(_, conn)| conn.clone())
            .ok_or_else(|| {
                redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "no primary known yet from the Sentinels",
                ))
            })
    }

    /// Asks the Sentinels which node is the primary, and follows it when it
    /// changed (a failover). Returns whether it changed.
    pub(super) async fn follow(&self) -> RedisResult<bool> {
        let client = {
            let mut sentinels = self.sentinels.lock().await;
            tokio::time::timeout(self.timeout * 2, sentinels.async_get_client())
                .await
                .map_err(|_| {
                    redis::RedisError::from((redis::ErrorKind::Io, "the Sentinels did not answer"))
                })??
        };
        let address = client.get_connection_info().addr().to_string();
        let known = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(address, _)| address.clone());
        if known.as_deref() == Some(address.as_str()) {
            return Ok(false);
        }
        let conn = ConnectionManager::new_lazy_with_config(client, manager_config(self.timeout))?;
        if let Some(previous) = known {
            tracing::warn!(from = %previous, to = %address, "the Sentinels name a new primary: following the failover");
        } else {
            tracing::info!(primary = %address, "the Sentinels name the primary");
        }
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some((address, conn));
        Ok(true)
    }

    /// A RESP3 client of the current primary, for the subscriber.
    async fn subscriber_client(&self) -> RedisResult<redis::Client> {
        let mut sentinels = self.sentinels.lock().await;
        let client = sentinels.async_get_client().await?;
        let info = client.get_connection_info().clone();
        let resp3 = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        redis::Client::open(info.set_redis_settings(resp3))
    }

    /// The primary's address, for `/readyz`.
    pub(super) fn primary_address(&self) -> Option<String> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(address, _)| address.clone())
    }
}

impl Commands {
    pub(super) fn is_cluster(&self) -> bool {
        matches!(self, Commands::Cluster(_))
    }

    pub(super) async fn query<T: FromRedisValue>(&self, command: &Cmd) -> RedisResult<T> {
        match self {
            Commands::Single(conn) => command.query_async(&mut conn.clone()).await,
            Commands::Cluster(cluster) => {
                command.query_async(&mut cluster.connection().await?).await
            }
            Commands::Sentinel(primary) => command.query_async(&mut primary.connection()?).await,
        }
    }

    /// `PING`; in a cluster, to every node, answered by the first that
    /// answers (redis-rs would send a plain `PING` to every primary and fail
    /// it when any one is down, which says nothing of the others).
    pub(super) async fn ping_one(&self) -> RedisResult<()> {
        let ping = redis::cmd("PING");
        match self {
            Commands::Cluster(cluster) => cluster
                .connection()
                .await?
                .route_command(ping, any_node())
                .await
                .map(drop),
            _ => self.query::<String>(&ping).await.map(drop),
        }
    }

    /// A pipeline whose keys share one slot (in a cluster, a pipeline goes to
    /// one node).
    pub(super) async fn pipe<T: FromRedisValue>(&self, pipe: &Pipeline) -> RedisResult<T> {
        match self {
            Commands::Single(conn) => pipe.query_async(&mut conn.clone()).await,
            Commands::Cluster(cluster) => pipe.query_async(&mut cluster.connection().await?).await,
            Commands::Sentinel(primary) => pipe.query_async(&mut primary.connection()?).await,
        }
    }

    /// Commands on keys of different slots, in one round trip: one pipeline
    /// on one server; side by side in a cluster, each to its slot's node
    /// (the cluster client keeps one multiplexed connection per node).
    pub(super) async fn each(&self, commands: &[Cmd]) -> RedisResult<Vec<Value>> {
        match self {
            Commands::Cluster(cluster) => {
                let conn = cluster.connection().await?;
                join_all(commands.iter().map(|command| {
                    let mut conn = conn.clone();
                    async move { command.query_async::<Value>(&mut conn).await }
                }))
                .await
                .into_iter()
                .collect()
            }
            _ => {
                let mut pipe = redis::pipe();
                for command in commands {
                    pipe.add_command(command.clone());
                }
                self.pipe(&pipe).await
            }
        }
    }
}

impl Subscriber {
    /// Opens a pub/sub connection whose messages go to `pushes`.
    pub(super) async fn connect(
        &self,
        pushes: mpsc::UnboundedSender<PushInfo>,
        timeout: Duration,
    ) -> RedisResult<Subscription> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_push_sender(pushes.clone());
        match self {
            Subscriber::Single(client) => Ok(Subscription::Plain(
                client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?,
            )),
            Subscriber::Sentinel(primary) => {
                let client = primary.subscriber_client().await?;
                Ok(Subscription::Plain(
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?,
                ))
            }
            Subscriber::Cluster(nodes, timeout) => {
                let client = cluster_client(nodes, *timeout, Some(pushes)).map_err(|err| {
                    redis::RedisError::from((redis::ErrorKind::Client, "cluster client", err.0))
                })?;
                Ok(Subscription::Sharded(client.get_async_connection().await?))
            }
        }
    }
}

impl Subscription {
    pub(super) async fn subscribe<S: AsRef<str>>(&mut self, channels: &[S]) -> RedisResult<()> {
        let channels: Vec<&str> = channels.iter().map(AsRef::as_ref).collect();
        match self {
            Subscription::Plain(conn) => conn.subscribe(channels).await,
            // One command per channel: channels of several slots in one
            // `SSUBSCRIBE` are refused (`CROSSSLOT`).
            Subscription::Sharded(conn) => join_all(channels.iter().map(|channel| {
                let mut conn = conn.clone();
                async move { conn.ssubscribe(*channel).await }
            }))
            .await
            .into_iter()
            .collect(),
        }
    }

    pub(super) async fn unsubscribe(&mut self, channels: &[String]) -> RedisResult<()> {
        match self {
            Subscription::Plain(conn) => conn.unsubscribe(channels).await,
            Subscription::Sharded(conn) => join_all(channels.iter().map(|channel| {
                let mut conn = conn.clone();
                async move { conn.sunsubscribe(channel).await }
            }))
            .await
            .into_iter()
            .collect(),
        }
    }

    pub(super) async fn ping(&mut self) -> RedisResult<String> {
        match self {
            Subscription::Plain(conn) => redis::cmd("PING").query_async(conn).await,
            // Any node: a plain `PING` goes to every primary and fails while
            // any one is down, which would make the subscriber reconnect to
            // the whole cluster (and lose its messages meanwhile) over and
            // over during one shard's outage.
            Subscription::Sharded(conn) => conn
                .route_command(redis::cmd("PING"), any_node())
                .await
                .and_then(|reply| Ok(String::from_redis_value(reply)?)),
        }
    }
}
