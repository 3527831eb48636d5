//! A TCP proxy that injects network faults between gateways and a real
//! `redis-server`: pauses, latency, closed and reset connections, refused
//! connections. It knows nothing of Redis (it forwards bytes), so what the
//! gateways meet is what a real network does to them, against a real server;
//! Redis's own faults (`CLIENT PAUSE`, `CLIENT KILL`, restarts) stay with
//! [`super::RedisServer`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// Listens on `127.0.0.1:0` and forwards every connection to `upstream`.
/// Dropping it stops it: its listener and every connection close.
pub struct FaultProxy {
    address: std::net::SocketAddr,
    control: Arc<Control>,
    /// Owns the connections (in a `JoinSet`): aborting it ends them all.
    acceptor: JoinHandle<()>,
}

/// What a test has set, read by every connection.
struct Control {
    upstream: String,
    paused: watch::Sender<bool>,
    delay: watch::Sender<Duration>,
    /// Each send cuts the connections open at that moment, in this way.
    cut: watch::Sender<Cut>,
    refuse: AtomicBool,
    open: AtomicUsize,
}

/// How [`FaultProxy`] ends the connections it cuts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// A FIN to both sides, as a peer that closes its socket.
    Close,
    /// An RST to both sides (`SO_LINGER` 0), as a crashed host or a firewall.
    Reset,
}

impl FaultProxy {
    /// Starts a proxy to `upstream` (like `"127.0.0.1:6379"`).
    pub async fn start(upstream: &str) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a free loopback port for the proxy");
        let address = listener.local_addr().expect("the proxy's address");
        let control = Arc::new(Control {
            upstream: upstream.to_owned(),
            paused: watch::Sender::new(false),
            delay: watch::Sender::new(Duration::ZERO),
            cut: watch::Sender::new(Cut::Close),
            refuse: AtomicBool::new(false),
            open: AtomicUsize::new(0),
        });
        let acceptor = tokio::spawn(accept(listener, Arc::clone(&control)));
        FaultProxy {
            address,
            control,
            acceptor,
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        self.address.to_string()
    }

    /// `redis://127.0.0.1:PORT`, for `REDIS_URL`.
    pub fn redis_url(&self) -> String {
        format!("redis://{}", self.address)
    }

    /// Stops forwarding both ways on every connection, new ones included.
    /// Connections stay open; what arrives is held, not lost.
    pub fn pause(&self) {
        self.control.paused.send_replace(true);
    }

    /// Forwards again, what was held first.
    pub fn resume(&self) {
        self.control.paused.send_replace(false);
    }

    /// Every chunk waits `delay` after it was read before it is written, both
    /// ways (`Duration::ZERO`: none). A direction forwards one chunk at a time,
    /// so this also bounds throughput: fine for request/response traffic.
    pub fn set_delay(&self, delay: Duration) {
        self.control.delay.send_replace(delay);
    }

    /// Closes every current connection (FIN to both sides); new ones work.
    /// Current means accepted: a connection still in the listen backlog is
    /// new. A test that needs it cut sends something through it first.
    pub fn drop_connections(&self) {
        self.control.cut.send_replace(Cut::Close);
    }

    /// Aborts every current connection with an RST to both sides; new ones work.
    pub fn reset_connections(&self) {
        self.control.cut.send_replace(Cut::Reset);
    }

    /// While `true`, new connections are accepted and closed at once.
    pub fn refuse_new(&self, refuse: bool) {
        self.control.refuse.store(refuse, Ordering::SeqCst);
    }

    /// Connections open through the proxy now.
    pub fn connection_count(&self) -> usize {
        self.control.open.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

async fn accept(listener: TcpListener, control: Arc<Control>) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // Out of file descriptors, most likely: do not spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        while connections.try_join_next().is_some() {}
        if control.refuse.load(Ordering::SeqCst) {
            drop(client);
            continue;
        }
        // Counted and subscribed to cuts from the moment it is accepted, so
        // a cut right after `connect` returns in the test still reaches it.
        let open = Open::new(&control);
        let cuts = control.cut.subscribe();
        connections.spawn(proxy(client, Arc::clone(&control), cuts, open));
    }
}

/// One open connection in [`Control::open`], until dropped.
struct Open(Arc<Control>);

impl Open {
    fn new(control: &Arc<Control>) -> Open {
        control.open.fetch_add(1, Ordering::SeqCst);
        Open(Arc::clone(control))
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn proxy(
    mut client: TcpStream,
    control: Arc<Control>,
    mut cuts: watch::Receiver<Cut>,
    _open: Open,
) {
    let Ok(mut server) = TcpStream::connect(&control.upstream).await else {
        return;
    };
    let cut = {
        // Borrowed halves: dropping them sends nothing, so a reset is not
        // preceded by a FIN.
        let (client_read, client_write) = client.split();
        let (server_read, server_write) = server.split();
        let forward = async {
            tokio::join!(
                pump(client_read, server_write, &control),
                pump(server_read, client_write, &control),
            )
        };
        tokio::select! {
            _ = forward => None,
            changed = cuts.changed() => changed.ok().map(|()| *cuts.borrow()),
        }
    };
    match cut {
        Some(Cut::Reset) => {
            let _ = client.set_zero_linger();
            let _ = server.set_zero_linger();
        }
        Some(Cut::Close) | None => {
            let _ = client.shutdown().await;
            let _ = server.shutdown().await;
        }
    }
}

/// Forwards `from` to `to` until `from` ends (passing the half-close on) or
/// either side fails, holding each chunk while paused and for the delay.
async fn pump(
    mut from: tokio::net::tcp::ReadHalf<'_>,
    mut to: tokio::net::tcp::WriteHalf<'_>,
    control: &Control,
) {
    let mut paused = control.paused.subscribe();
    let mut buffer = vec![0_u8; 16 * 1024];
    while let Ok(n) = from.read(&mut buffer).await {
        let read_at = Instant::now();
        // The end of the stream (`n == 0`) is held like data: a peer's close
        // does not pass a pause either.
        if paused.wait_for(|paused| !paused).await.is_err() {
            break;
        }
        let delay = *control.delay.borrow();
        tokio::time::sleep_until(read_at + delay).await;
        if n == 0 || to.write_all(&buffer[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
