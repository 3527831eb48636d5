//! The one fixture of the integration tests: a simulated BI on loopback and
//! real gateway processes in front of it, plus helpers that build the
//! contract's requests and compute the rows the BI must return for them.
//!
//! A test reads like the contract: start a [`TestEnv`], send GraphQL, then ask
//! the [`Sim`] what the gateway really sent to the BI. Multi-instance tests
//! also look into Redis and start, kill and restart `redis-server`s of their
//! own (the [`redis`] part of the fixture).

// Each area uses its own part of the fixture; the others look unused to it.
#![allow(dead_code)]

use std::future::Future;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use analytics_gateway::catalog::Catalog;
use analytics_gateway::config::{Cli, Config};
use analytics_gateway::query::{
    AggregateQuery, FilterOperator, Granularity, OrderDirection, PlannedQuery, Planner,
    RawAggregate, RawFilter, RawOptions, RawOrder,
};
use analytics_gateway::sim::{self, SimConfig, SimStats, Simulator};
use clap::CommandFactory;
use futures_util::future::join_all;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

mod deployments;
pub mod live;
mod proxy;
mod redis;
pub use self::deployments::{RedisCluster, RedisSentinels, SENTINEL_MASTER};
pub use self::proxy::FaultProxy;
pub use self::redis::{LAYOUT, RedisServer, closed_port, query, redis_connection};

/// Longest a gateway may take to say it is listening.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest any single HTTP exchange of a test may take: a bug fails the test
/// instead of hanging it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// `REDIS_TIMEOUT_MS` for multi-instance tests about coalescing rather than
/// about Redis timeouts: a loaded 2-core machine can starve a process past a
/// sub-second timeout, and one timed-out PING degrades the whole instance
/// (see `redis_faults::one_slow_redis_reply_is_not_an_outage`).
pub const PATIENT_REDIS_TIMEOUT_MS: u64 = 3_000;

/// The GraphQL document every dashboard client sends, as the contract spells it.
pub const PANEL_QUERY: &str = "query Panel($input: AggregateInput!) { aggregate(input: $input) { rows cache { status key } } }";

/// Bounds `future` by `limit`, failing the test with `what` when it passes.
pub async fn within<T>(limit: Duration, what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// Polls `check` every 50 ms until it holds, failing the test after `limit`.
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    within(limit, what, async {
        while !check().await {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .expect("an HTTP client")
}

/// The simulated BI, served in-process on a loopback port until the test's
/// runtime ends (or the `Sim` is dropped).
pub struct Sim {
    simulator: Simulator,
    address: std::net::SocketAddr,
    http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<std::io::Result<()>>>,
}

impl Sim {
    pub async fn start(latency: Duration) -> Sim {
        Sim::start_with(SimConfig {
            latency,
            security: None,
        })
        .await
    }

    /// A simulated BI configured by hand (its security-context mode, ...).
    pub async fn start_with(config: SimConfig) -> Sim {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a free loopback port for bi-sim");
        let address = listener.local_addr().expect("bi-sim's bound address");
        let simulator = Simulator::new(config);
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(sim::serve(listener, simulator.clone(), async move {
            // Either a send or the sender's drop stops the server.
            let _ = stopped.await;
        }));
        Sim {
            simulator,
            address,
            http: http_client(),
            stop: Some(stop),
            server: Some(server),
        }
    }

    /// Takes the BI away: stops listening and closes its idle connections,
    /// so that every later request to it is refused, as when the BI goes down.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = within(REQUEST_TIMEOUT, "bi-sim to stop", server).await;
        }
    }

    /// The Cube base URL the gateway is given as `BI_URL`.
    pub fn base_url(&self) -> String {
        format!("http://{}/cubejs-api/v1", self.address)
    }

    /// What the BI has received so far.
    pub fn stats(&self) -> SimStats {
        self.simulator.stats()
    }

    /// Zeroes the counters and clears the faults.
    pub async fn reset(&self) {
        self.control("reset", None).await;
    }

    /// Injects faults (`POST /_sim/faults`), like `{"continueWait": 3}`.
    pub async fn faults(&self, faults: Value) {
        self.control("faults", Some(faults)).await;
    }

    /// Moves the BI's data to `version` (`POST /_sim/data-version`): new
    /// numbers from the next `/load` on.
    pub async fn set_data_version(&self, version: u64) {
        self.control("data-version", Some(json!({ "version": version })))
            .await;
    }

    async fn control(&self, route: &str, body: Option<Value>) {
        let mut request = self
            .http
            .post(format!("http://{}/_sim/{route}", self.address));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = within(REQUEST_TIMEOUT, "bi-sim's control API", request.send())
            .await
            .expect("bi-sim answers its control API");
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        assert!(
            status.is_success(),
            "POST /_sim/{route}: HTTP {status}: {text}"
        );
    }
}

/// Lines a process printed, kept for failure messages.
type Output = Arc<Mutex<Vec<String>>>;

/// One real gateway process. It is killed when dropped.
pub struct Gateway {
    child: Child,
    address: String,
    instance_id: String,
    output: Output,
    http: reqwest::Client,
}

impl Gateway {
    /// Starts the binary with `env` (on top of a clean gateway environment)
    /// and waits until it logs the address it listens on.
    pub async fn start(env: &[(String, String)]) -> Gateway {
        let mut command = Command::new(env!("CARGO_BIN_EXE_analytics-gateway"));
        // The developer's shell must not change what a test runs against:
        // every setting the gateway reads comes from the test alone.
        for arg in Cli::command().get_arguments() {
            if let Some(variable) = arg.get_env() {
                command.env_remove(variable);
            }
        }
        command
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("the gateway binary starts");

        let output: Output = Arc::default();
        let (lines_tx, mut lines_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        drain(stdout, Arc::clone(&output), Some(lines_tx));
        drain(stderr, Arc::clone(&output), None);

        let address = tokio::time::timeout(START_TIMEOUT, async {
            while let Some(line) = lines_rx.recv().await {
                if let Some(address) = listening_address(&line) {
                    return Some(address);
                }
            }
            None
        })
        .await;
        let address = match address {
            Ok(Some(address)) => address,
            failure => {
                let _ = child.kill();
                let _ = child.wait();
                let why = if failure.is_err() {
                    format!("it did not log its address within {START_TIMEOUT:?}")
                } else {
                    "it exited before logging its address".to_owned()
                };
                panic!(
                    "the gateway did not start: {why}; its output:\n{}",
                    output_text(&output)
                );
            }
        };
        // Like `Command::envs`, the last setting of a variable wins.
        let instance_id = env
            .iter()
            .rev()
            .find(|(name, _)| name == "INSTANCE_ID")
            .map(|(_, id)| id.clone())
            .unwrap_or_default();
        Gateway {
            child,
            address,
            instance_id,
            output,
            http: http_client(),
        }
    }

    /// The `INSTANCE_ID` it was started with (empty when none was set): the
    /// first part of the Redis lock tokens it writes.
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// A handle that sends requests to this gateway from anywhere (a spawned
    /// task, after the gateway was killed), without borrowing it.
    pub fn client(&self) -> GatewayClient {
        GatewayClient {
            url: self.url(),
            http: self.http.clone(),
        }
    }

    /// `POST /graphql` with `body`: status, degraded-mode header and JSON.
    pub async fn reply(&self, body: &Value) -> Reply {
        self.client()
            .graphql(body)
            .await
            .unwrap_or_else(|err| panic!("{err}; gateway output:\n{}", self.output()))
    }

    /// `GET /readyz`: its HTTP status and JSON body.
    pub async fn readyz(&self) -> (u16, Value) {
        self.client()
            .readyz()
            .await
            .unwrap_or_else(|err| panic!("{err}; gateway output:\n{}", self.output()))
    }

    /// `http://ADDR`, without a path.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the process printed so far, for failure messages.
    pub fn output(&self) -> String {
        output_text(&self.output)
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits (at most `limit`) for the process to exit by itself.
    pub async fn wait_for_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status,
                Ok(None) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(None) => panic!(
                    "the gateway did not exit within {limit:?}; its output:\n{}",
                    self.output()
                ),
                Err(err) => panic!("cannot wait for the gateway: {err}"),
            }
        }
    }

    /// `POST /graphql` with `body`; the JSON answer, whatever its HTTP status.
    pub async fn graphql(&self, body: &Value) -> Value {
        let response = self.post_raw("/graphql", body.to_string()).await;
        let text = response.text().await.expect("a readable body");
        serde_json::from_str(&text)
            .unwrap_or_else(|err| panic!("POST /graphql answered non-JSON ({err}): {text}"))
    }

    /// `POST path` with a raw body labelled as JSON.
    pub async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
        let request = self
            .http
            .post(format!("{}{path}", self.url()))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        within(REQUEST_TIMEOUT, path, request.send())
            .await
            .unwrap_or_else(|err| {
                panic!(
                    "POST {path} failed: {err}; gateway output:\n{}",
                    self.output()
                )
            })
    }

    /// The HTTP status the gateway answers to the head of a `POST path` that
    /// announces a JSON body of `content_length` bytes, none of which is sent:
    /// the head says `Expect: 100-continue`, so the gateway answers a body it
    /// refuses at once instead of waiting for it.
    pub async fn status_of_announced_post(&self, path: &str, content_length: usize) -> u16 {
        use std::io::Write;
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {content_length}\r\nExpect: 100-continue\r\n\r\n",
            self.address
        );
        let address = self.address.clone();
        let exchange = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
            let mut stream = std::net::TcpStream::connect(&address)?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            stream.write_all(head.as_bytes())?;
            let mut status_line = String::new();
            BufReader::new(stream).read_line(&mut status_line)?;
            Ok(status_line)
        });
        let status_line = within(REQUEST_TIMEOUT, path, exchange)
            .await
            .expect("the exchange does not panic")
            .unwrap_or_else(|err| panic!("POST {path} head: {err}"));
        status_line
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP status line: {status_line:?}"))
    }

    /// `GET path` (with a query string if any).
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.get_with(path, &[]).await
    }

    /// `GET path` with extra request headers.
    pub async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut request = self.http.get(format!("{}{path}", self.url()));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        within(REQUEST_TIMEOUT, path, request.send())
            .await
            .unwrap_or_else(|err| {
                panic!(
                    "GET {path} failed: {err}; gateway output:\n{}",
                    self.output()
                )
            })
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What one GraphQL exchange brought back.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    /// The `x-gateway-degraded` header, set while Redis is unavailable.
    pub degraded: Option<String>,
    pub body: Value,
}

/// Sends requests to one gateway; cheap to clone and `'static`, so requests
/// can run on spawned tasks while the test kills the gateway or its Redis.
#[derive(Clone)]
pub struct GatewayClient {
    url: String,
    http: reqwest::Client,
}

impl GatewayClient {
    /// `POST /graphql` with `body`. `Err` when the exchange fails at transport
    /// level (the gateway is gone) or its answer is not JSON.
    pub async fn graphql(&self, body: &Value) -> Result<Reply, String> {
        let request = self
            .http
            .post(format!("{}/graphql", self.url))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string());
        let exchange = async {
            let response = request.send().await?;
            let status = response.status().as_u16();
            let degraded = response
                .headers()
                .get("x-gateway-degraded")
                .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
            let text = response.text().await?;
            Ok::<_, reqwest::Error>((status, degraded, text))
        };
        let (status, degraded, text) = within(REQUEST_TIMEOUT, "POST /graphql", exchange)
            .await
            .map_err(|err| format!("POST {}/graphql failed: {err}", self.url))?;
        let body = serde_json::from_str(&text)
            .map_err(|err| format!("POST /graphql answered non-JSON ({err}): {text}"))?;
        Ok(Reply {
            status,
            degraded,
            body,
        })
    }

    /// `GET /readyz`: its HTTP status and JSON body.
    pub async fn readyz(&self) -> Result<(u16, Value), String> {
        let exchange = async {
            let response = self.http.get(format!("{}/readyz", self.url)).send().await?;
            let status = response.status().as_u16();
            Ok::<_, reqwest::Error>((status, response.json::<Value>().await?))
        };
        within(REQUEST_TIMEOUT, "GET /readyz", exchange)
            .await
            .map_err(|err| format!("GET {}/readyz failed: {err}", self.url))
    }
}

/// One request sent by [`TestEnv::spawn_fire`], still on its way.
pub struct InFlight {
    /// Index of the gateway it was sent to.
    pub instance: usize,
    pub reply: JoinHandle<Result<Reply, String>>,
}

impl InFlight {
    /// Its outcome; a panic of the task fails the test.
    pub async fn outcome(self) -> Result<Reply, String> {
        self.reply.await.expect("the request task does not panic")
    }
}

/// Copies a process's output into `output` on a thread of its own (so the
/// pipe never fills up), forwarding lines to `lines` while anyone listens.
fn drain(
    stream: impl Read + Send + 'static,
    output: Output,
    lines: Option<tokio::sync::mpsc::UnboundedSender<String>>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if let Some(lines) = &lines {
                let _ = lines.send(line.clone());
            }
            output
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(line);
        }
    });
}

fn output_text(output: &Output) -> String {
    output
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .join("\n")
}

/// `ADDR` from the gateway's `... listening on http://ADDR/graphql` log line.
fn listening_address(line: &str) -> Option<String> {
    let rest = line.split("listening on http://").nth(1)?;
    let (address, _) = rest.split_once("/graphql")?;
    Some(address.to_owned())
}

/// How to start a [`TestEnv`].
#[derive(Debug, Clone)]
pub struct TestOptions {
    /// Gateway processes, all in front of the same bi-sim.
    pub instances: usize,
    /// bi-sim's latency for every `/load`.
    pub latency_ms: u64,
    /// More gateway environment, applied last: it can override `BI_URL` too.
    pub extra_env: Vec<(String, String)>,
    /// Environment of one gateway only (by index), applied after `extra_env`.
    pub instance_env: Vec<(usize, String, String)>,
    /// Which Redis the gateways share, if any.
    pub redis: RedisTarget,
    /// bi-sim's security-context mode: the API secret tokens must be
    /// signed with (the claim is the gateway's default, `customerId`).
    pub sim_secret: Option<String>,
}

/// The Redis a [`TestEnv`]'s gateways are pointed at (`REDIS_URL`).
#[derive(Debug, Clone, Default)]
pub enum RedisTarget {
    /// None: embedded single-instance mode.
    #[default]
    None,
    /// The test command's shared `redis-server` (`TEST_REDIS_URL`), or, when
    /// that is unset (`cargo test` run directly), a private one for the env.
    Shared,
    /// This URL: a test's private [`RedisServer`], or a port nobody listens on.
    Url(String),
    /// A Redis Cluster, by its seed nodes (`REDIS_CLUSTER_NODES`).
    Cluster(String),
    /// A Sentinel-managed primary, by its Sentinels (`REDIS_SENTINEL_NODES`,
    /// service [`SENTINEL_MASTER`]).
    Sentinel(String),
}

impl Default for TestOptions {
    fn default() -> Self {
        TestOptions {
            instances: 1,
            latency_ms: 300,
            extra_env: Vec::new(),
            instance_env: Vec::new(),
            redis: RedisTarget::None,
            sim_secret: None,
        }
    }
}

impl TestOptions {
    pub fn latency_ms(mut self, latency_ms: u64) -> Self {
        self.latency_ms = latency_ms;
        self
    }

    pub fn env(mut self, name: &str, value: impl ToString) -> Self {
        self.extra_env.push((name.to_owned(), value.to_string()));
        self
    }

    /// Sets `name` for gateway `instance` only.
    pub fn instance_env(mut self, instance: usize, name: &str, value: impl ToString) -> Self {
        self.instance_env
            .push((instance, name.to_owned(), value.to_string()));
        self
    }

    /// Makes bi-sim check every token's security context, signed with `secret`.
    pub fn sim_secret(mut self, secret: &str) -> Self {
        self.sim_secret = Some(secret.to_owned());
        self
    }

    pub fn instances(mut self, instances: usize) -> Self {
        self.instances = instances;
        self
    }

    /// Shares the Redis that the test command started (`TEST_REDIS_URL`);
    /// every env still gets its own key namespace.
    pub fn redis(mut self) -> Self {
        self.redis = RedisTarget::Shared;
        self
    }

    /// Points the gateways at this Redis URL (a private server, a closed port).
    pub fn redis_at(mut self, url: impl Into<String>) -> Self {
        self.redis = RedisTarget::Url(url.into());
        self
    }

    /// Points the gateways at a Redis Cluster.
    pub fn redis_cluster(mut self, cluster: &RedisCluster) -> Self {
        self.redis = RedisTarget::Cluster(cluster.seeds());
        self
    }

    /// Points the gateways at a Sentinel-managed primary.
    pub fn redis_sentinel(mut self, sentinels: &RedisSentinels) -> Self {
        self.redis = RedisTarget::Sentinel(sentinels.nodes());
        self
    }
}

/// One bi-sim and the gateways in front of it. All instances share one
/// random `CACHE_NAMESPACE`, so tests can share one Redis without meeting;
/// gateway `i` is started with `INSTANCE_ID=gw-i`.
pub struct TestEnv {
    pub sim: Sim,
    pub gateways: Vec<Gateway>,
    pub namespace: String,
    /// The gateways' `REDIS_URL`, if any (not set for a cluster or Sentinels).
    pub redis_url: Option<String>,
    /// The env's own Redis when `TEST_REDIS_URL` is unset; after the gateways
    /// so that it is dropped (killed) after them.
    _private_redis: Option<RedisServer>,
}

impl TestEnv {
    pub async fn start(options: TestOptions) -> TestEnv {
        let sim = Sim::start_with(SimConfig {
            latency: Duration::from_millis(options.latency_ms),
            security: options.sim_secret.map(|secret| sim::SimSecurity {
                secret,
                claim: "customerId".to_owned(),
            }),
        })
        .await;
        let namespace = format!("it-{}", uuid::Uuid::new_v4().simple());
        let mut env = vec![
            ("GATEWAY_LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
            ("BI_URL".to_owned(), sim.base_url()),
            ("CACHE_NAMESPACE".to_owned(), namespace.clone()),
            ("RUST_LOG".to_owned(), "info".to_owned()),
        ];
        let (redis_url, private_redis) = match options.redis {
            RedisTarget::None => (None, None),
            RedisTarget::Cluster(seeds) => {
                env.push(("REDIS_CLUSTER_NODES".to_owned(), seeds));
                (None, None)
            }
            RedisTarget::Sentinel(nodes) => {
                env.push(("REDIS_SENTINEL_NODES".to_owned(), nodes));
                env.push((
                    "REDIS_SENTINEL_MASTER".to_owned(),
                    SENTINEL_MASTER.to_owned(),
                ));
                (None, None)
            }
            RedisTarget::Url(url) => (Some(url), None),
            RedisTarget::Shared => match std::env::var("TEST_REDIS_URL") {
                Ok(url) if !url.trim().is_empty() => (Some(url), None),
                _ => {
                    let server = RedisServer::start(&["--notify-keyspace-events", "KA"]).await;
                    (Some(server.url()), Some(server))
                }
            },
        };
        if let Some(url) = &redis_url {
            env.push(("REDIS_URL".to_owned(), url.clone()));
        }
        env.extend(options.extra_env.iter().cloned());
        let mut gateways = Vec::with_capacity(options.instances);
        for i in 0..options.instances.max(1) {
            let mut gateway_env = vec![("INSTANCE_ID".to_owned(), format!("gw-{i}"))];
            gateway_env.extend(env.iter().cloned());
            gateway_env.extend(
                options
                    .instance_env
                    .iter()
                    .filter(|(instance, _, _)| *instance == i)
                    .map(|(_, name, value)| (name.clone(), value.clone())),
            );
            gateways.push(Gateway::start(&gateway_env).await);
        }
        TestEnv {
            sim,
            gateways,
            namespace,
            redis_url,
            _private_redis: private_redis,
        }
    }

    /// Every gateway's output, labelled, for failure messages.
    pub fn logs(&self) -> String {
        self.gateways
            .iter()
            .enumerate()
            .map(|(i, gateway)| format!("--- gateway {i} output:\n{}", gateway.output()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The index of the gateway started with `INSTANCE_ID=instance_id`.
    pub fn gateway_index(&self, instance_id: &str) -> usize {
        self.gateways
            .iter()
            .position(|g| g.instance_id() == instance_id)
            .unwrap_or_else(|| panic!("no gateway of this env is instance `{instance_id}`"))
    }

    /// The first (often the only) gateway.
    pub fn gateway(&self) -> &Gateway {
        &self.gateways[0]
    }

    /// Sends `body` `n` times at once, spread round-robin over the instances;
    /// the answers come back in sending order.
    pub async fn fire(&self, n: usize, body: &Value) -> Vec<Value> {
        let bodies = vec![body.clone(); n];
        self.fire_all(&bodies).await
    }

    /// Sends every body at once, spread round-robin over the instances.
    pub async fn fire_all(&self, bodies: &[Value]) -> Vec<Value> {
        let targeted: Vec<(usize, Value)> = bodies
            .iter()
            .enumerate()
            .map(|(i, body)| (i % self.gateways.len(), body.clone()))
            .collect();
        self.fire_on(&targeted).await
    }

    /// Sends every `(gateway index, body)` at once; the answers come back in
    /// sending order.
    pub async fn fire_on(&self, requests: &[(usize, Value)]) -> Vec<Value> {
        // One task per request: on a multi-thread runtime the client's own
        // work is spread over its workers, so the requests reach the gateways
        // closer together than from one task polling them all.
        let in_flight = requests.iter().map(|(instance, body)| {
            let client = self.gateways[*instance].client();
            let body = body.clone();
            (
                *instance,
                tokio::spawn(async move { client.graphql(&body).await }),
            )
        });
        let in_flight: Vec<_> = in_flight.collect();
        let outcomes = within(
            REQUEST_TIMEOUT,
            "concurrent GraphQL answers",
            join_all(in_flight.into_iter().map(|(instance, reply)| async move {
                (
                    instance,
                    reply.await.expect("the request task does not panic"),
                )
            })),
        )
        .await;
        outcomes
            .into_iter()
            .map(|(instance, outcome)| match outcome {
                Ok(reply) => reply.body,
                Err(err) => panic!(
                    "{err}; gateway output:\n{}",
                    self.gateways[instance].output()
                ),
            })
            .collect()
    }

    /// Like [`TestEnv::fire_on`], with how long each request took, from
    /// just before it was sent to its whole answer.
    pub async fn fire_on_timed(&self, requests: &[(usize, Value)]) -> Vec<(Value, Duration)> {
        let in_flight: Vec<_> = requests
            .iter()
            .map(|(instance, body)| {
                let client = self.gateways[*instance].client();
                let body = body.clone();
                (
                    *instance,
                    tokio::spawn(async move {
                        let started = std::time::Instant::now();
                        let reply = client.graphql(&body).await;
                        (reply, started.elapsed())
                    }),
                )
            })
            .collect();
        let outcomes = within(
            REQUEST_TIMEOUT,
            "concurrent GraphQL answers",
            join_all(in_flight.into_iter().map(|(instance, reply)| async move {
                (
                    instance,
                    reply.await.expect("the request task does not panic"),
                )
            })),
        )
        .await;
        outcomes
            .into_iter()
            .map(|(instance, (outcome, took))| match outcome {
                Ok(reply) => (reply.body, took),
                Err(err) => panic!(
                    "{err}; gateway output:\n{}",
                    self.gateways[instance].output()
                ),
            })
            .collect()
    }

    /// Opens `connections` pooled connections to every gateway (that many
    /// concurrent `GET /healthz`), so that a stampede that follows does not
    /// pay for connection set-up while the BI call it waits for runs.
    pub async fn warm_up(&self, connections: usize) {
        let probes = self.gateways.iter().flat_map(|gateway| {
            (0..connections).map(move |_| async move {
                let status = gateway.get("/healthz").await.status();
                assert!(status.is_success(), "GET /healthz: {status}");
            })
        });
        within(REQUEST_TIMEOUT, "warm-up probes", join_all(probes)).await;
    }

    /// Sends `body` `n` times at once, round-robin over the instances, each on
    /// a spawned task: the test can kill a gateway or Redis meanwhile and
    /// collect the outcomes (transport failures included) afterwards.
    pub fn spawn_fire(&self, n: usize, body: &Value) -> Vec<InFlight> {
        (0..n)
            .map(|i| {
                let instance = i % self.gateways.len();
                let client = self.gateways[instance].client();
                let body = body.clone();
                InFlight {
                    instance,
                    reply: tokio::spawn(async move { client.graphql(&body).await }),
                }
            })
            .collect()
    }

    /// Waits until the gateway validates members against the BI's catalog:
    /// a `catalog` query that the gateway answers without asking the BI's
    /// `/meta` proves its catalog store is filled.
    pub async fn wait_for_catalog(&self) {
        let body = json!({"query": "{ catalog { cubes { name } } }"});
        for gateway in &self.gateways {
            wait_until(Duration::from_secs(20), "the catalog to load", || async {
                let before = self.sim.stats().meta_requests;
                let answer = gateway.graphql(&body).await;
                assert_eq!(
                    answer["data"]["catalog"]["cubes"][0]["name"], "Sales",
                    "{answer}"
                );
                self.sim.stats().meta_requests == before
            })
            .await;
        }
    }
}

/// The `input` variable of one panel, as the contract shapes it.
pub fn input(
    customer: &str,
    from: &str,
    to: &str,
    measures: &[&str],
    dimensions: &[&str],
    granularity: Option<&str>,
) -> Value {
    let mut input = json!({
        "customer": customer,
        "dateRange": {"from": from, "to": to},
        "measures": measures,
        "dimensions": dimensions,
    });
    if let Some(granularity) = granularity {
        input["granularity"] = json!(granularity);
    }
    input
}

/// The contract's `Panel` request for one panel.
pub fn panel(
    customer: &str,
    from: &str,
    to: &str,
    measures: &[&str],
    dimensions: &[&str],
    granularity: Option<&str>,
) -> Value {
    panel_body(input(customer, from, to, measures, dimensions, granularity))
}

/// The contract's `Panel` request for a question, and the rows the BI has for it.
pub fn panel_and_rows(
    customer: &str,
    from: &str,
    to: &str,
    measures: &[&str],
    dimensions: &[&str],
    granularity: Option<&str>,
) -> (Value, Value) {
    (
        panel(customer, from, to, measures, dimensions, granularity),
        expected_rows(customer, from, to, measures, dimensions, granularity),
    )
}

/// The contract's `Panel` request for an `input` variable built by hand.
pub fn panel_body(input: Value) -> Value {
    json!({"query": PANEL_QUERY, "variables": {"input": input}})
}

/// One document with an aliased `aggregate` field per input (`p0`, `p1`, ...).
pub fn dashboard(inputs: &[Value]) -> Value {
    let params: Vec<String> = (0..inputs.len())
        .map(|i| format!("$p{i}: AggregateInput!"))
        .collect();
    let fields: Vec<String> = (0..inputs.len())
        .map(|i| format!("p{i}: aggregate(input: $p{i}) {{ rows cache {{ status key }} }}"))
        .collect();
    let variables: serde_json::Map<String, Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, input)| (format!("p{i}"), input.clone()))
        .collect();
    json!({
        "query": format!("query Dashboard({}) {{ {} }}", params.join(", "), fields.join(" ")),
        "variables": variables,
    })
}

/// The rows bi-sim returns for this panel asked alone.
pub fn expected_rows(
    customer: &str,
    from: &str,
    to: &str,
    measures: &[&str],
    dimensions: &[&str],
    granularity: Option<&str>,
) -> Value {
    expected_rows_for(&input(
        customer,
        from,
        to,
        measures,
        dimensions,
        granularity,
    ))
}

/// The rows bi-sim returns for the panel of this `input` variable asked
/// alone. The BI query is planned by the gateway's own [`Planner`] with the
/// default settings, so the test does not re-implement planning.
pub fn expected_rows_for(input: &Value) -> Value {
    expected_rows_with(&Config::embedded_defaults(), input)
}

/// Like [`expected_rows_for`], for a gateway with `config` (a cubes file,
/// minted tokens): filters, order, limit, offset and timezone included.
pub fn expected_rows_with(config: &Config, input: &Value) -> Value {
    expected_rows_at(config, input, 0)
}

/// Like [`expected_rows_with`], at bi-sim's data `version`.
pub fn expected_rows_at(config: &Config, input: &Value, version: u64) -> Value {
    let planned = plan_with(config, input);
    let rows = sim::answer_at(&planned.cube, version).expect("bi-sim answers the planned query");
    serde_json::to_value(rows).expect("rows are JSON")
}

/// The gateway's plan of the panel of this `input` variable, as a gateway
/// with `config` and a known catalog (bi-sim's) makes it.
pub fn plan_with(config: &Config, input: &Value) -> PlannedQuery {
    let strings = |value: &Value| -> Vec<String> {
        value
            .as_array()
            .map(|values| {
                values
                    .iter()
                    .map(|v| v.as_str().expect("strings").to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let granularity = input["granularity"].as_str().map(|g| match g {
        "HOUR" => Granularity::Hour,
        "DAY" => Granularity::Day,
        "WEEK" => Granularity::Week,
        "MONTH" => Granularity::Month,
        "QUARTER" => Granularity::Quarter,
        "YEAR" => Granularity::Year,
        other => panic!("no expected rows for granularity {other}"),
    });
    let operator = |name: &str| match name {
        "EQUALS" => FilterOperator::Equals,
        "NOT_EQUALS" => FilterOperator::NotEquals,
        "CONTAINS" => FilterOperator::Contains,
        "NOT_CONTAINS" => FilterOperator::NotContains,
        "STARTS_WITH" => FilterOperator::StartsWith,
        "ENDS_WITH" => FilterOperator::EndsWith,
        "GT" => FilterOperator::Gt,
        "GTE" => FilterOperator::Gte,
        "LT" => FilterOperator::Lt,
        "LTE" => FilterOperator::Lte,
        "SET" => FilterOperator::Set,
        "NOT_SET" => FilterOperator::NotSet,
        other => panic!("no operator {other}"),
    };
    let (measures, dimensions) = (strings(&input["measures"]), strings(&input["dimensions"]));
    let no_filters = Vec::new();
    let filters = input["filters"].as_array().unwrap_or(&no_filters);
    let filter_values: Vec<Vec<String>> = filters.iter().map(|f| strings(&f["values"])).collect();
    let no_order = Vec::new();
    let order = input["order"].as_array().unwrap_or(&no_order);
    let catalog = Catalog::new(sim::meta(), std::sync::Arc::clone(&config.query.cubes));
    let query = AggregateQuery::parse_with(
        RawAggregate {
            customer: input["customer"].as_str().expect("a customer"),
            from: input["dateRange"]["from"].as_str().expect("dateRange.from"),
            to: input["dateRange"]["to"].as_str().expect("dateRange.to"),
            measures: &measures,
            dimensions: &dimensions,
            granularity,
        },
        RawOptions {
            filters: filters
                .iter()
                .zip(&filter_values)
                .map(|(f, values)| RawFilter {
                    member: f["member"].as_str().expect("a filter member"),
                    operator: operator(f["operator"].as_str().expect("an operator")),
                    values,
                })
                .collect(),
            order: order
                .iter()
                .map(|o| RawOrder {
                    member: o["member"].as_str().expect("an order member"),
                    direction: match o["direction"].as_str() {
                        Some("DESC") => OrderDirection::Desc,
                        _ => OrderDirection::Asc,
                    },
                })
                .collect(),
            limit: input["limit"].as_i64(),
            offset: input["offset"].as_i64(),
            timezone: input["timezone"].as_str(),
        },
        &config.query,
        Some(&catalog),
    )
    .expect("expected rows are computed for valid inputs only");
    Planner::new(config.planner.clone(), "expected-rows").plan(&query)
}

/// Runs the gateway binary with `env` (on a clean environment) until it
/// exits by itself, as a start-up that must fail does: its status and output.
pub async fn run_to_exit(env: &[(String, String)]) -> (ExitStatus, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_analytics-gateway"));
    for arg in Cli::command().get_arguments() {
        if let Some(variable) = arg.get_env() {
            command.env_remove(variable);
        }
    }
    command
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("the gateway binary starts");
    let deadline = std::time::Instant::now() + START_TIMEOUT;
    // A start-up error is a line or two: the pipes never fill meanwhile.
    while child
        .try_wait()
        .expect("the child can be waited on")
        .is_none()
    {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().expect("the killed child's output");
            panic!(
                "the gateway did not exit within {START_TIMEOUT:?}; its output:\n{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let output = child.wait_with_output().expect("the child's output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status, text)
}

/// Another spelling of the same question (`variant` picks which): the
/// filters in another order, a filter's values in another order, the
/// timezone in lower case, the default offset spelt out. The gateway must
/// give every spelling the same entry.
pub fn respelt(input: &Value, variant: usize) -> Value {
    let mut input = input.clone();
    if let Some(filters) = input["filters"].as_array_mut() {
        if variant % 2 == 1 {
            filters.reverse();
        }
        if variant % 3 == 1 {
            for filter in filters.iter_mut() {
                if let Some(values) = filter["values"].as_array_mut() {
                    values.reverse();
                }
            }
        }
    }
    if variant % 4 >= 2
        && let Some(timezone) = input["timezone"].as_str()
    {
        input["timezone"] = json!(timezone.to_ascii_lowercase());
    }
    if variant % 5 == 3 && input.get("offset").is_none() {
        input["offset"] = json!(0);
    }
    input
}

/// How many answers of a stampede had each `cache.status`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Statuses {
    pub miss: usize,
    pub coalesced: usize,
    pub hit: usize,
}

/// Checks that every answer is a `Panel` answer with the `expected` rows and
/// no errors, and counts their `cache.status`es.
pub fn statuses(answers: &[Value], expected: &Value) -> Statuses {
    let mut statuses = Statuses::default();
    for (i, answer) in answers.iter().enumerate() {
        assert!(answer.get("errors").is_none(), "answer {i}: {answer}");
        let aggregate = &answer["data"]["aggregate"];
        assert_eq!(aggregate["rows"], *expected, "answer {i}: {answer}");
        match aggregate["cache"]["status"].as_str() {
            Some("MISS") => statuses.miss += 1,
            Some("COALESCED") => statuses.coalesced += 1,
            Some("HIT") => statuses.hit += 1,
            _ => panic!("answer {i} has no cache status: {answer}"),
        }
    }
    statuses
}

/// `extensions.code` of the first error of an answer (`None` without errors).
pub fn error_code(answer: &Value) -> Option<&str> {
    answer["errors"][0]["extensions"]["code"].as_str()
}

/// The value of one Prometheus sample, found by name and labels (in any order).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, series_labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            if series_name != name {
                return None;
            }
            let mut found: Vec<(String, String)> = series_labels
                .split(',')
                .filter(|pair| !pair.is_empty())
                .filter_map(|pair| {
                    let (k, v) = pair.split_once('=')?;
                    Some((k.to_owned(), v.trim_matches('"').to_owned()))
                })
                .collect();
            let mut wanted: Vec<(String, String)> = labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            found.sort();
            wanted.sort();
            (found == wanted).then(|| value.parse().ok()).flatten()
        })
}
