//! Live panels' transport: GraphQL over WebSocket (`graphql-transport-ws`,
//! and the older `graphql-ws`) on `GET /graphql` with an `Upgrade`.
//!
//! async-graphql runs the protocol ([`async_graphql::http::WebSocket`]); this
//! module drives it, so that the gateway decides three things itself:
//! - who the connection is: the credentials in `connection_init`'s payload
//!   (`Authorization` or `x-api-key`, as HTTP headers are read), refused with
//!   close code 4403; every subscribe checks the identity again;
//! - when the connection ends: when its JWT expires (close code 4403, "the
//!   credential expired");
//! - how long a send may stay blocked: a client that does not read has its
//!   connection closed after `LIVE_SEND_TIMEOUT_SECS`. Until then, at most
//!   one message waits for it: each subscription keeps only its latest event.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_graphql::http::{
    WebSocket as GraphqlWebSocket, WebSocketProtocols as Protocols, WsMessage,
};
use async_graphql::{Data, Executor};
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::stream::BoxStream;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::time::Instant;

use super::{AppState, check_limits};
use crate::auth::Identity;
use crate::cache::unix_millis;
use crate::graphql::classify_request_errors;
use crate::live::ConnectionSubscriptions;
use crate::telemetry::names;

/// The close code of a refused or expired credential (graphql-ws's
/// "Forbidden").
const CLOSE_FORBIDDEN: u16 = 4403;

/// graphql-transport-ws's close for a `connection_init` that did not come in time.
const CLOSE_INIT_TIMEOUT: u16 = 4408;

/// How many bytes of frames are gathered before a write to the socket.
const WRITE_BUFFER_BYTES: usize = 8 * 1024;

/// Most messages gathered into one flush (the events ready at once).
const MAX_BATCH: usize = 128;

/// The largest message a client may send (a subscribe is one document).
const MAX_CLIENT_MESSAGE_BYTES: usize = 256 * 1024;

/// Upgrades `GET /graphql` to a GraphQL WebSocket, if the client speaks one
/// of the protocols.
pub(super) fn upgrade(state: Arc<AppState>, headers: &HeaderMap, ws: WebSocketUpgrade) -> Response {
    let protocol = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .find_map(|name| name.trim().parse::<Protocols>().ok());
    let Some(protocol) = protocol else {
        return (
            StatusCode::BAD_REQUEST,
            "a GraphQL WebSocket needs `Sec-WebSocket-Protocol: graphql-transport-ws`",
        )
            .into_response();
    };
    ws.protocols([protocol.sec_websocket_protocol()])
        .max_message_size(MAX_CLIENT_MESSAGE_BYTES)
        // Frames are gathered up to this size before a write: the events of
        // one refresh go out in a few writes, not one per subscription. Small:
        // a connection is mostly idle, and thousands are open.
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .on_upgrade(move |socket| serve(state, socket, protocol))
}

/// The schema behind the same document limits as HTTP's, with every error
/// of a subscription given its `extensions.code` as for HTTP.
#[derive(Clone)]
struct LiveExecutor(Arc<AppState>);

impl Executor for LiveExecutor {
    async fn execute(&self, mut request: async_graphql::Request) -> async_graphql::Response {
        if let Err(refused) = check_limits(&self.0, &mut request) {
            return async_graphql::Response::from_errors(vec![refused]);
        }
        let mut response = self.0.schema.execute(request).await;
        classify_request_errors(&mut response);
        response
    }

    fn execute_stream(
        &self,
        mut request: async_graphql::Request,
        session_data: Option<Arc<Data>>,
    ) -> BoxStream<'static, async_graphql::Response> {
        if let Err(refused) = check_limits(&self.0, &mut request) {
            let refused = async_graphql::Response::from_errors(vec![refused]);
            return futures_util::stream::once(std::future::ready(refused)).boxed();
        }
        self.0
            .schema
            .execute_stream_with_session_data(request, session_data.unwrap_or_default())
            .map(|mut response| {
                classify_request_errors(&mut response);
                response
            })
            .boxed()
    }
}

/// What `connection_init` decided, for the connection's driver.
#[derive(Default)]
struct Admission {
    /// The credential was refused: the protocol's close is 4403.
    refused: AtomicBool,
    /// `connection_init` came (accepted or refused).
    initialised: AtomicBool,
    /// When the credential expires (seconds since the Unix epoch).
    expires_at: Mutex<Option<u64>>,
}

async fn serve(state: Arc<AppState>, socket: WebSocket, protocol: Protocols) {
    let (mut sink, stream) = socket.split();
    // When the client last sent anything, pongs included: a peer that went
    // away without closing (power, a NAT mapping gone) is found by this, not
    // by a failed write (nothing is written while the rows do not change).
    let heard = Arc::new(Mutex::new(Instant::now()));
    let heard_in = Arc::clone(&heard);
    let input = stream
        .take_while(|message| std::future::ready(message.is_ok()))
        .filter_map(move |message| {
            *heard_in.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
            std::future::ready(match message {
                Ok(Message::Text(text)) => Some(axum::body::Bytes::from(text)),
                Ok(Message::Binary(bytes)) => Some(bytes),
                _ => None,
            })
        });
    let admission = Arc::new(Admission::default());
    let authenticator = state.authenticator.clone();
    let admitted = Arc::clone(&admission);
    let mut protocol_stream =
        GraphqlWebSocket::new(LiveExecutor(Arc::clone(&state)), input, protocol)
            .on_connection_init(move |payload| async move {
                let identity = match &authenticator {
                    None => Identity::Open,
                    Some(authenticator) => authenticator.identify(&credentials(&payload)),
                };
                admitted.initialised.store(true, Ordering::Relaxed);
                if let Identity::Unauthenticated(err) = &identity {
                    admitted.refused.store(true, Ordering::Relaxed);
                    return Err(async_graphql::Error::new(err.to_string()));
                }
                *admitted
                    .expires_at
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = identity.expires_at();
                let mut data = Data::default();
                data.insert(identity);
                data.insert(ConnectionSubscriptions::default());
                Ok(data)
            });
    let send_timeout = state.live.settings().send_timeout;
    // A ping every send timeout; a client silent for three of them (no pong)
    // is gone. `connection_init` must come within the first answer's time.
    let mut pings = tokio::time::interval_at(Instant::now() + send_timeout, send_timeout);
    pings.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let init_deadline = Instant::now() + state.live.settings().first_answer_timeout;
    loop {
        let expires_at = *admission
            .expires_at
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let expiry = async {
            match expires_at {
                Some(exp) => {
                    let left = exp.saturating_mul(1000).saturating_sub(unix_millis());
                    tokio::time::sleep_until(
                        Instant::now() + std::time::Duration::from_millis(left),
                    )
                    .await;
                }
                None => std::future::pending().await,
            }
        };
        let message = tokio::select! {
            message = protocol_stream.next() => match message {
                Some(message) => message,
                None => break,
            },
            () = expiry => {
                metrics::counter!(names::LIVE_CLOSED, "reason" => "expired").increment(1);
                WsMessage::Close(CLOSE_FORBIDDEN, "the credential expired".to_owned())
            }
            () = tokio::time::sleep_until(init_deadline),
                if !admission.initialised.load(Ordering::Relaxed) =>
            {
                metrics::counter!(names::LIVE_CLOSED, "reason" => "init_timeout").increment(1);
                WsMessage::Close(CLOSE_INIT_TIMEOUT, "connection_init did not come in time".to_owned())
            }
            _ = pings.tick() => {
                let silent = heard.lock().unwrap_or_else(|p| p.into_inner()).elapsed();
                if silent > send_timeout * 3 {
                    metrics::counter!(names::LIVE_CLOSED, "reason" => "unresponsive").increment(1);
                    tracing::info!("closed a live connection whose client stopped answering pings");
                    break;
                }
                let ping = sink.send(Message::Ping(axum::body::Bytes::new()));
                match tokio::time::timeout(send_timeout, ping).await {
                    Ok(Ok(())) => continue,
                    _ => break,
                }
            }
        };
        let (message, last) = frame(message, &admission);
        // This message and every other one ready now, in one flush.
        let send = async {
            sink.feed(message).await?;
            let mut last = last;
            let mut batched = 1;
            while !last && batched < MAX_BATCH {
                match protocol_stream.next().now_or_never() {
                    Some(Some(next)) => {
                        let (next, is_last) = frame(next, &admission);
                        sink.feed(next).await?;
                        last = is_last;
                        batched += 1;
                    }
                    Some(None) => last = true,
                    None => break,
                }
            }
            sink.flush().await?;
            Ok::<bool, axum::Error>(last)
        };
        match tokio::time::timeout(send_timeout, send).await {
            Ok(Ok(false)) => {}
            Ok(Ok(true)) | Ok(Err(_)) => break,
            Err(_) => {
                metrics::counter!(names::LIVE_CLOSED, "reason" => "slow_consumer").increment(1);
                tracing::info!("closed a live connection whose sends stayed blocked");
                break;
            }
        }
    }
    // Dropping the protocol's stream drops its subscriptions: their keys
    // forget them here.
}

/// The WebSocket frame of one protocol message, and whether it is the last
/// (a close). A close after refused credentials is 4403.
fn frame(message: WsMessage, admission: &Admission) -> (Message, bool) {
    match message {
        WsMessage::Text(text) => (Message::Text(text.into()), false),
        WsMessage::Close(code, reason) => {
            let code = if admission.refused.load(Ordering::Relaxed) {
                CLOSE_FORBIDDEN
            } else {
                code
            };
            let frame = CloseFrame {
                code,
                reason: reason.into(),
            };
            (Message::Close(Some(frame)), true)
        }
    }
}

/// The credentials of a `connection_init` payload, as HTTP headers (the
/// names in any case): `Authorization` and `x-api-key`.
fn credentials(payload: &serde_json::Value) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Some(fields) = payload.as_object() {
        for (name, value) in fields {
            let Some(value) = value.as_str() else {
                continue;
            };
            let name = name.to_ascii_lowercase();
            if (name == "authorization" || name == "x-api-key")
                && let (Ok(name), Ok(value)) = (
                    HeaderName::try_from(name.as_str()),
                    HeaderValue::from_str(value),
                )
            {
                headers.insert(name, value);
            }
        }
    }
    headers
}
