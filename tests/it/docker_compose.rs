//! The checked-in deployment: `docker-compose.yml` is a valid Compose file.
//! There is no Docker engine here, so the check is the one that needs none.

use std::process::{Command, Stdio};
use std::time::Duration;

/// Longest `docker-compose config` may take.
const CONFIG_TIMEOUT: Duration = Duration::from_secs(60);

/// `docker-compose config -q` at the repo root accepts `docker-compose.yml`
/// (Debian's `docker-compose`, which the test command installs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_compose_config_is_valid() {
    let root = env!("CARGO_MANIFEST_DIR");
    let spawned = Command::new("docker-compose")
        .args(["config", "-q"])
        .current_dir(root)
        // The developer's shell must not choose other files or a project.
        .env_remove("COMPOSE_FILE")
        .env_remove("COMPOSE_PROJECT_NAME")
        .env_remove("COMPOSE_PATH_SEPARATOR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => panic!(
            "docker-compose is not installed (not on PATH): run the tests with scripts/test, \
             which installs Debian's docker-compose package"
        ),
        Err(err) => panic!("cannot run docker-compose: {err}"),
    };
    let deadline = tokio::time::Instant::now() + CONFIG_TIMEOUT;
    let status = loop {
        match child.try_wait().expect("docker-compose can be waited for") {
            Some(status) => break status,
            None if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("docker-compose config did not finish within {CONFIG_TIMEOUT:?}");
            }
        }
    };
    let output = child.wait_with_output().expect("docker-compose's output");
    assert!(
        status.success(),
        "docker-compose config -q rejects docker-compose.yml ({status}):\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `docker-compose config` of the repo, as JSON (through Python's YAML
/// module, which Debian's docker-compose depends on).
fn resolved_compose_file() -> serde_json::Value {
    let config = Command::new("docker-compose")
        .arg("config")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("COMPOSE_FILE")
        .env_remove("COMPOSE_PROFILES")
        .output()
        .expect("docker-compose runs (scripts/test installs it)");
    assert!(
        config.status.success(),
        "{}",
        String::from_utf8_lossy(&config.stderr)
    );
    let mut python = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3, which docker-compose runs on");
    use std::io::Write;
    python
        .stdin
        .take()
        .expect("stdin")
        .write_all(&config.stdout)
        .expect("python3 reads the configuration");
    let json = python.wait_with_output().expect("python3's output");
    assert!(json.status.success());
    serde_json::from_slice(&json.stdout).expect("JSON")
}

/// The services a profile starts: those of no profile, and its own.
fn services_of(config: &serde_json::Value, profile: &str) -> Vec<(String, serde_json::Value)> {
    config["services"]
        .as_object()
        .expect("services")
        .iter()
        .filter(|(_, service)| match service["profiles"].as_array() {
            None => true,
            Some(profiles) => profiles.iter().any(|p| p == profile),
        })
        .map(|(name, service)| (name.clone(), service.clone()))
        .collect()
}

/// The default profile (`.env`) runs three gateways on one Redis; the
/// `cluster` profile runs three on a six-node Redis Cluster instead, under
/// the same names for the load balancer and Prometheus, and one service
/// publishes port 4000 in each.
#[test]
fn the_cluster_profile_puts_the_gateways_on_a_redis_cluster() {
    let dotenv = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.env"))
        .expect("the repo's .env");
    assert!(
        dotenv.lines().any(|l| l == "COMPOSE_PROFILES=single"),
        "{dotenv}"
    );
    let config = resolved_compose_file();
    let gateways = |profile: &str| -> Vec<serde_json::Value> {
        services_of(&config, profile)
            .into_iter()
            .filter(|(_, s)| s["command"][0] == "analytics-gateway")
            .map(|(_, s)| s)
            .collect()
    };
    let publishers = |profile: &str| {
        services_of(&config, profile)
            .into_iter()
            .filter(|(_, s)| s["ports"].to_string().contains("4000"))
            .count()
    };

    let single = gateways("single");
    assert_eq!(single.len(), 3);
    for gateway in &single {
        assert_eq!(gateway["environment"]["REDIS_URL"], "redis://redis:6379");
        assert!(gateway["environment"]["REDIS_CLUSTER_NODES"].is_null());
    }
    let cluster = gateways("cluster");
    assert_eq!(cluster.len(), 3);
    let mut aliases = Vec::new();
    for gateway in &cluster {
        assert!(gateway["environment"]["REDIS_URL"].is_null(), "{gateway}");
        let seeds = gateway["environment"]["REDIS_CLUSTER_NODES"]
            .as_str()
            .expect("REDIS_CLUSTER_NODES");
        assert_eq!(seeds.split(',').count(), 3, "{seeds}");
        aliases.push(gateway["networks"]["default"]["aliases"][0].clone());
    }
    aliases.sort_by_key(|a| a.to_string());
    assert_eq!(aliases, ["gateway-1", "gateway-2", "gateway-3"]);
    let nodes: Vec<_> = services_of(&config, "cluster")
        .into_iter()
        .filter(|(name, _)| name.starts_with("redis-node-"))
        .collect();
    assert_eq!(nodes.len(), 6);
    for (name, node) in &nodes {
        assert!(
            node["command"].to_string().contains("--cluster-enabled"),
            "{name}"
        );
    }
    assert!(
        services_of(&config, "cluster")
            .iter()
            .all(|(name, _)| name != "redis"),
        "no single Redis in the cluster profile"
    );
    assert_eq!((publishers("single"), publishers("cluster")), (1, 1));
}
