//! The Redis part of the fixture: private `redis-server`s for the tests that
//! kill, restart or reconfigure Redis, and a look into what the gateways wrote.
//!
//! Tests that only need a Redis share the test command's (`TEST_REDIS_URL`,
//! see [`super::RedisTarget::Shared`]); a private server is for a test that
//! would otherwise disturb the others.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;

use super::{Output, TestEnv, drain, output_text, within};

/// The version part of every Redis key the gateway writes (`{ns}:v3:...`).
pub const LAYOUT: &str = "v3";

/// Longest a `redis-server` may take to answer its first PING.
const REDIS_START_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest one inspection command of a test may take.
const REDIS_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// A `redis-server` of one test on a free loopback port, without persistence
/// (`--save '' --appendonly no`): a restart starts empty. Killed when dropped.
pub struct RedisServer {
    port: u16,
    args: Vec<String>,
    child: Option<Child>,
    output: Output,
}

impl RedisServer {
    /// Starts one with `extra_args` after the defaults (they win), like
    /// `["--notify-keyspace-events", ""]`, and waits until it answers.
    pub async fn start(extra_args: &[&str]) -> RedisServer {
        let args: Vec<String> = extra_args.iter().map(|&a| a.to_owned()).collect();
        let mut failures = Vec::new();
        // The free port can be taken between the probe and redis-server's own
        // bind (tests run in parallel): then try another one.
        for _ in 0..3 {
            let mut server = RedisServer {
                port: closed_port(),
                args: args.clone(),
                child: None,
                output: Arc::default(),
            };
            match server.spawn().await {
                Ok(()) => return server,
                Err(why) => failures.push(why),
            }
        }
        panic!(
            "redis-server did not start:\n{}",
            failures.join("\n-----\n")
        );
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: the server vanishes without a word to its clients.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills it (if running) and starts it again, empty, on the same port
    /// with the same arguments.
    pub async fn restart(&mut self) {
        self.kill();
        if let Err(why) = self.spawn().await {
            panic!("redis-server did not restart on port {}: {why}", self.port);
        }
    }

    /// A fresh connection to it.
    pub async fn connection(&self) -> MultiplexedConnection {
        redis_connection(&self.url()).await
    }

    async fn spawn(&mut self) -> Result<(), String> {
        let port = self.port.to_string();
        let dir = std::env::temp_dir();
        let spawned = Command::new("redis-server")
            .args(["--port", &port, "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&dir)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => panic!(
                "redis-server is not installed (not on PATH): run the tests with \
                 scripts/test, which installs it and starts a shared one"
            ),
            Err(err) => panic!("cannot start redis-server: {err}"),
        };
        self.output = Arc::default();
        drain(
            child.stdout.take().expect("piped stdout"),
            Arc::clone(&self.output),
            None,
        );
        drain(
            child.stderr.take().expect("piped stderr"),
            Arc::clone(&self.output),
            None,
        );
        let url = self.url();
        let started = tokio::time::Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                // Give the drain threads a moment to collect its last words.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return Err(format!(
                    "redis-server on port {port} exited ({status}); its output:\n{}",
                    output_text(&self.output)
                ));
            }
            if ping(&url).await {
                self.child = Some(child);
                return Ok(());
            }
            if started.elapsed() > REDIS_START_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "redis-server on port {port} did not answer PING within \
                     {REDIS_START_TIMEOUT:?}; its output:\n{}",
                    output_text(&self.output)
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether a Redis answers PING at `url` within a second.
async fn ping(url: &str) -> bool {
    let attempt = async {
        let client = redis::Client::open(url).ok()?;
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .ok()
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), attempt).await,
        Ok(Some(_))
    )
}

/// A loopback port that nothing listens on (right now).
pub fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
    listener.local_addr().expect("a bound address").port()
}

/// A fresh connection to the Redis at `url`, for a test to look with.
pub async fn redis_connection(url: &str) -> MultiplexedConnection {
    let client = redis::Client::open(url).unwrap_or_else(|err| panic!("{url}: {err}"));
    // The crate's default 500 ms response timeout is shorter than a loaded
    // machine may need; `within` bounds every wait anyway.
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(REDIS_COMMAND_TIMEOUT))
        .set_response_timeout(Some(REDIS_COMMAND_TIMEOUT));
    within(
        REDIS_COMMAND_TIMEOUT,
        "a Redis connection",
        client.get_multiplexed_async_connection_with_config(&config),
    )
    .await
    .unwrap_or_else(|err| panic!("cannot connect to Redis at {url}: {err}"))
}

/// Runs one Redis command of a test, bounded; a failure fails the test.
pub async fn query<T: redis::FromRedisValue>(
    conn: &mut MultiplexedConnection,
    command: &redis::Cmd,
) -> T {
    within(
        REDIS_COMMAND_TIMEOUT,
        "a Redis command",
        command.query_async::<T>(conn),
    )
    .await
    .unwrap_or_else(|err| panic!("Redis command failed: {err}"))
}

impl TestEnv {
    /// A fresh connection to the env's Redis.
    pub async fn redis(&self) -> MultiplexedConnection {
        let url = self
            .redis_url
            .as_deref()
            .expect("this env has no Redis (TestOptions::redis)");
        redis_connection(url).await
    }

    /// The env's Redis keys `{ns}:v3:*:{suffix}` (`value`, `lock`), sorted.
    pub async fn redis_keys(&self, suffix: &str) -> Vec<String> {
        let mut conn = self.redis().await;
        let pattern = format!("{}:{LAYOUT}:*:{suffix}", self.namespace);
        let mut keys = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = query(
                &mut conn,
                redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1_000),
            )
            .await;
            keys.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        keys.sort();
        keys.dedup();
        keys
    }

    /// Waits (at most `limit`) until one of the env's lock keys exists, and
    /// returns the instance id in its owner token (`<instance>:<uuid>`).
    pub async fn wait_for_lock_owner(&self, limit: Duration) -> String {
        let mut conn = self.redis().await;
        let pattern = format!("{}:{LAYOUT}:*:lock", self.namespace);
        let token = within(limit, "a lock key in Redis", async {
            loop {
                let keys: Vec<String> = query(&mut conn, redis::cmd("KEYS").arg(&pattern)).await;
                for key in keys {
                    let token: Option<String> = query(&mut conn, redis::cmd("GET").arg(&key)).await;
                    if let Some(token) = token {
                        return token;
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        let (instance, _uuid) = token
            .rsplit_once(':')
            .unwrap_or_else(|| panic!("a lock token is `<instance>:<uuid>`, not {token:?}"));
        instance.to_owned()
    }
}

impl TestEnv {
    /// Makes gateway `instance` a dead leader of `body`'s key: it takes the
    /// key's lock, its BI call reaches the BI (a paid call), and it is
    /// SIGKILLed. Its lock stays in Redis until it expires.
    pub async fn kill_a_leader(&mut self, instance: usize, body: &serde_json::Value) {
        let leader = self.gateways[instance].client();
        let calls_before = self.sim.stats().http_requests;
        let dying = tokio::spawn({
            let body = body.clone();
            async move { leader.graphql(&body).await }
        });
        let owner = self.wait_for_lock_owner(Duration::from_secs(20)).await;
        assert_eq!(owner, self.gateways[instance].instance_id(), "the leader");
        super::wait_until(Duration::from_secs(20), "the leader's BI call", || async {
            self.sim.stats().http_requests > calls_before
        })
        .await;
        self.gateways[instance].kill();
        let outcome = dying.await.expect("the request task does not panic");
        assert!(outcome.is_err(), "the killed leader answered: {outcome:?}");
    }
}
