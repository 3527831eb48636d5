//! A real GraphQL WebSocket client (`graphql-transport-ws` over
//! tokio-tungstenite) for the live-panel tests: one connection, several
//! subscriptions, every event kept with the time it arrived.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::Gateway;

/// The contract's live panel document.
pub const LIVE_QUERY: &str = "subscription LivePanel($input: AggregateInput!, $everySeconds: Int) { aggregateLive(input: $input, everySeconds: $everySeconds) { rows cache { status producedAt key } } }";

type Sink = SplitSink<WebSocketStream<MaybeTlsStream<TcpStream>>, Message>;

/// One message the server sent for a subscription, and when it came.
#[derive(Debug, Clone)]
pub struct Received {
    /// `next`'s payload (`{"data": ...}` or `{"errors": ...}`), or
    /// `{"complete": true}` for `complete`, `{"error": [...]}` for `error`.
    pub payload: Value,
    pub at: Instant,
}

#[derive(Default)]
struct Inbox {
    by_id: HashMap<String, Vec<Received>>,
    /// The close frame's code and reason, once closed.
    closed: Option<(u16, String)>,
    acked: bool,
}

/// One open connection.
pub struct LiveConnection {
    sink: Sink,
    inbox: Arc<Mutex<Inbox>>,
    reader: JoinHandle<()>,
}

/// How a connection attempt ended when it was not acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    pub code: u16,
    pub reason: String,
}

impl LiveConnection {
    /// Connects to `gateway` and sends `connection_init` with `payload`;
    /// `Err` with the close frame when the server refuses it.
    pub async fn connect(gateway: &Gateway, payload: Value) -> Result<LiveConnection, Closed> {
        let url = gateway.url().replacen("http://", "ws://", 1) + "/graphql";
        let mut request = url.into_client_request().expect("a WebSocket request");
        request.headers_mut().insert(
            "sec-websocket-protocol",
            "graphql-transport-ws".parse().expect("a header value"),
        );
        let (socket, response) = tokio_tungstenite::connect_async(request)
            .await
            .unwrap_or_else(|err| panic!("the WebSocket upgrade failed: {err}"));
        assert_eq!(
            response
                .headers()
                .get("sec-websocket-protocol")
                .and_then(|v| v.to_str().ok()),
            Some("graphql-transport-ws"),
            "the server speaks graphql-transport-ws"
        );
        let (mut sink, mut stream) = socket.split();
        let inbox = Arc::new(Mutex::new(Inbox::default()));
        let reading = Arc::clone(&inbox);
        let reader = tokio::spawn(async move {
            while let Some(message) = stream.next().await {
                let Ok(message) = message else { break };
                let at = Instant::now();
                let mut inbox = reading.lock().expect("the inbox is not poisoned");
                match message {
                    Message::Text(text) => {
                        let message: Value = serde_json::from_str(&text).expect("JSON messages");
                        let id = message["id"].as_str().unwrap_or_default().to_owned();
                        let payload = match message["type"].as_str() {
                            Some("connection_ack") => {
                                inbox.acked = true;
                                continue;
                            }
                            Some("next") => message["payload"].clone(),
                            Some("complete") => json!({"complete": true}),
                            Some("error") => json!({"error": message["payload"]}),
                            _ => continue,
                        };
                        inbox
                            .by_id
                            .entry(id)
                            .or_default()
                            .push(Received { payload, at });
                    }
                    Message::Close(frame) => {
                        inbox.closed = Some(
                            frame
                                .map(|f| (u16::from(f.code), f.reason.to_string()))
                                .unwrap_or((1005, String::new())),
                        );
                        break;
                    }
                    _ => {}
                }
            }
            let mut inbox = reading.lock().expect("the inbox is not poisoned");
            if inbox.closed.is_none() {
                inbox.closed = Some((1006, "the connection ended".to_owned()));
            }
        });
        sink.send(Message::text(
            json!({"type": "connection_init", "payload": payload}).to_string(),
        ))
        .await
        .expect("connection_init is sent");
        let connection = LiveConnection {
            sink,
            inbox,
            reader,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            {
                let inbox = connection.inbox.lock().expect("the inbox is not poisoned");
                if inbox.acked {
                    break;
                }
                if let Some((code, reason)) = &inbox.closed {
                    return Err(Closed {
                        code: *code,
                        reason: reason.clone(),
                    });
                }
            }
            assert!(Instant::now() < deadline, "no connection_ack within 10 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(connection)
    }

    /// Subscribes to the live panel of `input` as `id`.
    pub async fn subscribe(&mut self, id: &str, input: &Value, every_seconds: Option<u64>) {
        let message = json!({
            "id": id,
            "type": "subscribe",
            "payload": {
                "query": LIVE_QUERY,
                "variables": {"input": input, "everySeconds": every_seconds},
            },
        });
        self.sink
            .send(Message::text(message.to_string()))
            .await
            .expect("subscribe is sent");
    }

    /// Ends subscription `id` (the client's `complete`).
    pub async fn unsubscribe(&mut self, id: &str) {
        let message = json!({"id": id, "type": "complete"});
        self.sink
            .send(Message::text(message.to_string()))
            .await
            .expect("complete is sent");
    }

    /// Every message received for `id` so far.
    pub fn received(&self, id: &str) -> Vec<Received> {
        self.inbox
            .lock()
            .expect("the inbox is not poisoned")
            .by_id
            .get(id)
            .cloned()
            .unwrap_or_default()
    }

    /// The close frame, once the server closed the connection.
    pub fn closed(&self) -> Option<(u16, String)> {
        self.inbox
            .lock()
            .expect("the inbox is not poisoned")
            .closed
            .clone()
    }

    /// Waits until `id` has at least `n` messages; all of them.
    pub async fn wait_for(&self, id: &str, n: usize, limit: Duration) -> Vec<Received> {
        let deadline = Instant::now() + limit;
        loop {
            let received = self.received(id);
            if received.len() >= n {
                return received;
            }
            assert!(
                Instant::now() < deadline,
                "subscription {id} got {} messages within {limit:?}, not {n}: {received:?}; closed: {:?}",
                received.len(),
                self.closed()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until the server closes the connection; its code and reason.
    pub async fn wait_closed(&self, limit: Duration) -> (u16, String) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(closed) = self.closed() {
                return closed;
            }
            assert!(
                Instant::now() < deadline,
                "the connection is still open after {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for LiveConnection {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// The rows of a `next` payload's `aggregateLive`.
pub fn rows(received: &Received) -> &Value {
    &received.payload["data"]["aggregateLive"]["rows"]
}
