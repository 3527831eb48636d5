//! Redis deployments beyond one server, as real processes on loopback: a
//! 6-node Redis Cluster (3 primaries, 3 replicas) and a Sentinel-managed
//! primary (one replica, three Sentinels). The test command starts one
//! cluster that tests share (`TEST_REDIS_CLUSTER_NODES`); a test that kills
//! or reshards nodes, or fails a primary over, starts its own.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use redis::cluster_async::ClusterConnection;

use super::{redis::redis_connection, within};

/// A free loopback port whose cluster bus twin (port + 10000) is free too.
fn cluster_port() -> u16 {
    loop {
        let port = fastrand::u16(20_000..45_000);
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
}

fn spawn(program: &str, args: &[String]) -> Child {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|err| {
            panic!(
                "cannot start {program} (run the tests with scripts/test, which installs it): {err}"
            )
        })
}

async fn wait_for_ping(port: u16) {
    let url = format!("redis://127.0.0.1:{port}");
    within(Duration::from_secs(20), "a Redis node to start", async {
        loop {
            let attempt = async {
                let client = redis::Client::open(url.as_str()).ok()?;
                let mut conn = client.get_multiplexed_async_connection().await.ok()?;
                redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .ok()
            };
            if let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(1), attempt).await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

/// One command to one node, bounded.
async fn node_query<T: redis::FromRedisValue>(port: u16, command: &redis::Cmd) -> T {
    let mut conn = redis_connection(&format!("redis://127.0.0.1:{port}")).await;
    super::redis::query(&mut conn, command).await
}

/// A Redis Cluster of real `redis-server`s. Killed when dropped, when the
/// test started it.
pub struct RedisCluster {
    /// Node ports (all of them, primaries and replicas).
    ports: Vec<u16>,
    children: BTreeMap<u16, Child>,
    _dir: Option<tempdir::Dir>,
}

mod tempdir {
    /// A directory removed when dropped.
    pub struct Dir(pub std::path::PathBuf);

    impl Dir {
        pub fn new() -> Dir {
            let path =
                std::env::temp_dir().join(format!("it-redis-{}", uuid::Uuid::new_v4().simple()));
            std::fs::create_dir_all(&path).expect("a temporary directory");
            Dir(path)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl RedisCluster {
    /// The test command's cluster when there is one, else one of the test's own.
    pub async fn shared() -> RedisCluster {
        match std::env::var("TEST_REDIS_CLUSTER_NODES") {
            Ok(nodes) if !nodes.trim().is_empty() => RedisCluster {
                ports: nodes
                    .split(',')
                    .filter_map(|url| url.rsplit(':').next()?.parse().ok())
                    .collect(),
                children: BTreeMap::new(),
                _dir: None,
            },
            _ => RedisCluster::start(Duration::from_millis(1_500)).await,
        }
    }

    /// Six nodes (three primaries, each with a replica); a failover takes
    /// about twice `node_timeout`.
    pub async fn start(node_timeout: Duration) -> RedisCluster {
        let dir = tempdir::Dir::new();
        let mut children = BTreeMap::new();
        let mut ports = Vec::new();
        for _ in 0..6 {
            let port = cluster_port();
            let node_dir = dir.0.join(port.to_string());
            std::fs::create_dir_all(&node_dir).expect("a node directory");
            let args: Vec<String> = [
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                &node_timeout.as_millis().to_string(),
                // A replica that never synced cannot be promoted: sync at
                // once, not after the default 5 s wait for more replicas.
                "--repl-diskless-sync-delay",
                "0",
                "--dir",
                &node_dir.to_string_lossy(),
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
            children.insert(port, spawn("redis-server", &args));
            ports.push(port);
        }
        for &port in &ports {
            wait_for_ping(port).await;
        }
        let mut create = vec!["--cluster".to_owned(), "create".to_owned()];
        create.extend(ports.iter().map(|p| format!("127.0.0.1:{p}")));
        create.extend(["--cluster-replicas", "1", "--cluster-yes"].map(str::to_owned));
        let created = tokio::task::spawn_blocking(move || {
            Command::new("redis-cli")
                .args(&create)
                .stdin(Stdio::null())
                .output()
        })
        .await
        .expect("no panic")
        .expect("redis-cli runs");
        assert!(
            created.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        let cluster = RedisCluster {
            ports,
            children,
            _dir: Some(dir),
        };
        cluster.wait_until_ok().await;
        cluster.wait_for_roles().await;
        cluster
    }

    /// `redis://127.0.0.1:PORT,...`: every node, for `REDIS_CLUSTER_NODES`.
    pub fn seeds(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A cluster connection, for a test to look with.
    pub async fn connection(&self) -> ClusterConnection {
        let nodes: Vec<String> = self
            .live_ports()
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect();
        let client = redis::cluster::ClusterClient::builder(nodes)
            .response_timeout(Duration::from_secs(5))
            .build()
            .expect("a cluster client");
        within(
            Duration::from_secs(10),
            "a cluster connection",
            client.get_async_connection(),
        )
        .await
        .expect("a cluster connection")
    }

    /// The nodes not killed by the test (all of them, for the shared cluster).
    fn live_ports(&self) -> Vec<u16> {
        let owned = self._dir.is_some();
        self.ports
            .iter()
            .copied()
            .filter(|p| !owned || self.children.contains_key(p))
            .collect()
    }

    /// Waits until every live node says `cluster_state:ok`.
    pub async fn wait_until_ok(&self) {
        let live = self.live_ports();
        within(Duration::from_secs(30), "the cluster to be ok", async {
            loop {
                let mut ok = true;
                for &port in &live {
                    let info: String = node_query(port, redis::cmd("CLUSTER").arg("INFO")).await;
                    ok &= info.contains("cluster_state:ok");
                }
                if ok {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
    }

    /// Waits until the slots of the killed primary at `port` are served by
    /// another node (its promoted replica) and the cluster is ok again.
    pub async fn wait_for_failover(&self, port: u16) {
        within(Duration::from_secs(60), "the cluster to fail over", async {
            loop {
                let nodes = self.nodes().await;
                let replaced = !nodes
                    .iter()
                    .any(|(_, p, primary, slots)| *p == port && *primary && !slots.is_empty());
                if replaced && nodes.iter().filter(|n| n.2 && !n.3.is_empty()).count() == 3 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        self.wait_until_ok().await;
    }

    /// The slot of `key` (`CLUSTER KEYSLOT`).
    pub async fn slot_of(&self, key: &str) -> u16 {
        let port = self.live_port();
        node_query(port, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key)).await
    }

    fn live_port(&self) -> u16 {
        *self.live_ports().first().expect("a live node")
    }

    /// Every node as `CLUSTER NODES` says: `(id, port, primary?, slot ranges)`.
    pub async fn nodes(&self) -> Vec<(String, u16, bool, Vec<(u16, u16)>)> {
        self.nodes_seen_by(self.live_port()).await
    }

    /// Waits until every live node sees every other in its final role: the
    /// replicas are assigned after the slots, and gossip takes a moment.
    async fn wait_for_roles(&self) {
        let live = self.live_ports();
        within(
            Duration::from_secs(30),
            "the cluster's roles to settle",
            async {
                loop {
                    let mut settled = true;
                    for &port in &live {
                        let nodes = self.nodes_seen_by(port).await;
                        let primaries = nodes.iter().filter(|n| n.2 && !n.3.is_empty()).count();
                        let replicas = nodes.iter().filter(|n| !n.2).count();
                        settled &= primaries == 3 && replicas == 3;
                        let replication: String =
                            node_query(port, redis::cmd("INFO").arg("replication")).await;
                        settled &= !replication.contains("role:slave")
                            || replication.contains("master_link_status:up");
                    }
                    if settled {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        )
        .await;
    }

    async fn nodes_seen_by(&self, port: u16) -> Vec<(String, u16, bool, Vec<(u16, u16)>)> {
        let text: String = node_query(port, redis::cmd("CLUSTER").arg("NODES")).await;
        text.lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let port: u16 = fields
                    .get(1)?
                    .split('@')
                    .next()?
                    .rsplit(':')
                    .next()?
                    .parse()
                    .ok()?;
                let flags = fields.get(2)?;
                if flags.contains("fail") {
                    return None;
                }
                let slots = fields
                    .iter()
                    .skip(8)
                    .filter(|f| !f.starts_with('['))
                    .filter_map(|range| {
                        let (a, b) = range.split_once('-').unwrap_or((range, range));
                        Some((a.parse().ok()?, b.parse().ok()?))
                    })
                    .collect();
                Some((fields[0].to_owned(), port, flags.contains("master"), slots))
            })
            .collect()
    }

    /// The port of the primary serving `slot`.
    pub async fn primary_of_slot(&self, slot: u16) -> u16 {
        self.nodes()
            .await
            .into_iter()
            .find(|(_, _, primary, slots)| {
                *primary && slots.iter().any(|(a, b)| (*a..=*b).contains(&slot))
            })
            .map(|(_, port, _, _)| port)
            .unwrap_or_else(|| panic!("no primary serves slot {slot}"))
    }

    /// SIGKILL of one node the test started.
    pub fn kill(&mut self, port: u16) {
        let mut child = self
            .children
            .remove(&port)
            .expect("a node of this test's own cluster");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Moves `slot`, with its keys, to the primary at `to` (the way
    /// `redis-cli --cluster reshard` does, for one slot).
    pub async fn move_slot(&self, slot: u16, to: u16) {
        let nodes = self.nodes().await;
        let from = self.primary_of_slot(slot).await;
        let id_of = |port: u16| {
            nodes
                .iter()
                .find(|(_, p, _, _)| *p == port)
                .map(|(id, _, _, _)| id.clone())
                .expect("a known node")
        };
        let (from_id, to_id) = (id_of(from), id_of(to));
        let _: () = node_query(
            to,
            redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg("IMPORTING")
                .arg(&from_id),
        )
        .await;
        let _: () = node_query(
            from,
            redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg("MIGRATING")
                .arg(&to_id),
        )
        .await;
        loop {
            let keys: Vec<String> = node_query(
                from,
                redis::cmd("CLUSTER")
                    .arg("GETKEYSINSLOT")
                    .arg(slot)
                    .arg(100),
            )
            .await;
            if keys.is_empty() {
                break;
            }
            let _: () = node_query(
                from,
                redis::cmd("MIGRATE")
                    .arg("127.0.0.1")
                    .arg(to)
                    .arg("")
                    .arg(0)
                    .arg(5_000)
                    .arg("KEYS")
                    .arg(&keys),
            )
            .await;
        }
        for (_, port, primary, _) in &nodes {
            if *primary {
                let _: () = node_query(
                    *port,
                    redis::cmd("CLUSTER")
                        .arg("SETSLOT")
                        .arg(slot)
                        .arg("NODE")
                        .arg(&to_id),
                )
                .await;
            }
        }
        self.wait_until_ok().await;
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for child in self.children.values_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A primary, its replica, and three Sentinels watching them (service
/// `mymaster`, a failover after 1 s without the primary). Killed when dropped.
pub struct RedisSentinels {
    pub primary: u16,
    pub replica: u16,
    sentinels: Vec<u16>,
    children: BTreeMap<u16, Child>,
    _dir: tempdir::Dir,
}

/// The Sentinel service name of [`RedisSentinels`]' primary.
pub const SENTINEL_MASTER: &str = "mymaster";

impl RedisSentinels {
    pub async fn start() -> RedisSentinels {
        let dir = tempdir::Dir::new();
        let mut children = BTreeMap::new();
        let data = |port: u16| {
            let path = dir.0.join(port.to_string());
            std::fs::create_dir_all(&path).expect("a data directory");
            path.to_string_lossy().into_owned()
        };
        let server = |port: u16, extra: &[String]| {
            let mut args: Vec<String> = [
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--repl-diskless-sync-delay",
                "0",
                "--dir",
                &data(port),
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
            args.extend_from_slice(extra);
            spawn("redis-server", &args)
        };
        let primary = cluster_port();
        children.insert(primary, server(primary, &[]));
        wait_for_ping(primary).await;
        let replica = cluster_port();
        children.insert(
            replica,
            server(
                replica,
                &[
                    "--replicaof".to_owned(),
                    "127.0.0.1".to_owned(),
                    primary.to_string(),
                ],
            ),
        );
        wait_for_ping(replica).await;
        within(Duration::from_secs(30), "the replica to sync", async {
            loop {
                let replication: String =
                    node_query(replica, redis::cmd("INFO").arg("replication")).await;
                if replication.contains("master_link_status:up") {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            let port = cluster_port();
            let config = dir.0.join(format!("sentinel-{port}.conf"));
            std::fs::write(
                &config,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\n\
                     sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {primary} 2\n\
                     sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n\
                     sentinel failover-timeout {SENTINEL_MASTER} 5000\n\
                     sentinel parallel-syncs {SENTINEL_MASTER} 1\n",
                    data(port)
                ),
            )
            .expect("a Sentinel configuration");
            children.insert(
                port,
                spawn("redis-sentinel", &[config.to_string_lossy().into_owned()]),
            );
            sentinels.push(port);
        }
        for &port in &sentinels {
            wait_for_ping(port).await;
        }
        let this = RedisSentinels {
            primary,
            replica,
            sentinels,
            children,
            _dir: dir,
        };
        this.wait_for_primary(primary).await;
        this
    }

    /// `redis://127.0.0.1:PORT,...` of the Sentinels, for `REDIS_SENTINEL_NODES`.
    pub fn nodes(&self) -> String {
        self.sentinels
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until every Sentinel names `port` as the primary and knows of a replica.
    pub async fn wait_for_primary(&self, port: u16) {
        within(
            Duration::from_secs(60),
            "the Sentinels to agree on the primary",
            async {
                loop {
                    let mut agreed = true;
                    for &sentinel in &self.sentinels {
                        let address: Vec<String> = node_query(
                            sentinel,
                            redis::cmd("SENTINEL")
                                .arg("get-master-addr-by-name")
                                .arg(SENTINEL_MASTER),
                        )
                        .await;
                        agreed &= address.get(1).map(String::as_str) == Some(&port.to_string());
                    }
                    if agreed {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        )
        .await;
    }

    /// SIGKILL of the primary: the Sentinels promote the replica.
    pub fn kill_primary(&mut self) {
        if let Some(mut child) = self.children.remove(&self.primary) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisSentinels {
    fn drop(&mut self) {
        for child in self.children.values_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
