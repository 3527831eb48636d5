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
