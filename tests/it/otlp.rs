//! The trace part of the fixture: an OTLP receiver on loopback that keeps
//! every span the gateways export, with its resource attributes, so that a
//! test can read a trace the way Jaeger would show it.
//!
//! Two transports, as `OTEL_EXPORTER_OTLP_PROTOCOL` offers: gRPC (a tonic
//! `TraceService` built from `opentelemetry-proto`) and HTTP/protobuf
//! (`POST /v1/traces` on axum, decoded with prost).

// Each trace test uses its own part of the receiver; the others look unused to it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::IntoResponse;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode as SpanStatus;
use prost::Message;
use tokio::sync::oneshot;

/// One exported span and the resource (process) that exported it.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub span: Span,
    /// Resource attributes as text, like `service.instance.id` → `gw-0`.
    pub resource: BTreeMap<String, String>,
}

impl ReceivedSpan {
    pub fn name(&self) -> &str {
        &self.span.name
    }

    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }

    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }

    /// Empty for a root span.
    pub fn parent_span_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }

    pub fn kind(&self) -> SpanKind {
        SpanKind::try_from(self.span.kind).unwrap_or(SpanKind::Unspecified)
    }

    /// The span's status code (`Unset` when it has none).
    pub fn status(&self) -> SpanStatus {
        self.span
            .status
            .as_ref()
            .and_then(|status| SpanStatus::try_from(status.code).ok())
            .unwrap_or(SpanStatus::Unset)
    }

    /// One attribute's value, if the span has it.
    pub fn attribute(&self, key: &str) -> Option<&any_value::Value> {
        find(&self.span.attributes, key)
    }

    /// One attribute as text (numbers and booleans printed), if present.
    pub fn text(&self, key: &str) -> Option<String> {
        self.attribute(key).map(value_text)
    }

    /// One integer attribute, if present and an integer.
    pub fn int(&self, key: &str) -> Option<i64> {
        match self.attribute(key)? {
            any_value::Value::IntValue(value) => Some(*value),
            _ => None,
        }
    }

    /// `(trace id, span id)` of every link, as hex.
    pub fn links(&self) -> Vec<(String, String)> {
        self.span
            .links
            .iter()
            .map(|link| (hex(&link.trace_id), hex(&link.span_id)))
            .collect()
    }

    /// Every text the span carries: its name, attribute keys and values,
    /// event names and attributes, link attributes and resource attributes.
    /// What must never hold personal data lives somewhere in here.
    pub fn all_text(&self) -> Vec<String> {
        let mut texts = vec![self.span.name.clone()];
        let mut attributes = |list: &[KeyValue]| {
            for pair in list {
                texts.push(pair.key.clone());
                if let Some(value) = pair.value.as_ref().and_then(|v| v.value.as_ref()) {
                    texts.push(value_text(value));
                }
            }
        };
        attributes(&self.span.attributes);
        for event in &self.span.events {
            attributes(&event.attributes);
        }
        for link in &self.span.links {
            attributes(&link.attributes);
        }
        texts.extend(self.span.events.iter().map(|event| event.name.clone()));
        texts.extend(
            self.resource
                .iter()
                .flat_map(|(k, v)| [k.clone(), v.clone()]),
        );
        texts
    }

    /// A one-line description for failure messages.
    pub fn describe(&self) -> String {
        let attributes: Vec<String> = self
            .span
            .attributes
            .iter()
            .map(|pair| {
                let value = pair
                    .value
                    .as_ref()
                    .and_then(|v| v.value.as_ref())
                    .map(value_text)
                    .unwrap_or_default();
                format!("{}={value}", pair.key)
            })
            .collect();
        format!(
            "{} [{:?}, {:?}] trace={} span={} parent={} links={:?} instance={} {{{}}}",
            self.span.name,
            self.kind(),
            self.status(),
            self.trace_id(),
            self.span_id(),
            self.parent_span_id(),
            self.links(),
            self.resource
                .get("service.instance.id")
                .map_or("?", String::as_str),
            attributes.join(", ")
        )
    }
}

fn find<'a>(list: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    list.iter()
        .find(|pair| pair.key == key)
        .and_then(|pair| pair.value.as_ref())
        .and_then(|value| value.value.as_ref())
}

fn value_text(value: &any_value::Value) -> String {
    match value {
        any_value::Value::StringValue(text) => text.clone(),
        any_value::Value::BoolValue(flag) => flag.to_string(),
        any_value::Value::IntValue(number) => number.to_string(),
        any_value::Value::DoubleValue(number) => number.to_string(),
        any_value::Value::BytesValue(bytes) => hex(bytes),
        any_value::Value::ArrayValue(array) => {
            let items: Vec<String> = array
                .values
                .iter()
                .filter_map(|v: &AnyValue| v.value.as_ref())
                .map(value_text)
                .collect();
            format!("[{}]", items.join(","))
        }
        other => format!("{other:?}"),
    }
}

/// Lower-case hex, as trace and span ids are written in `traceparent`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Everything a receiver has been sent.
#[derive(Clone, Default)]
pub struct Received {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    /// Requests the receiver could not take (a wrong path, an undecodable
    /// body), for failure messages.
    problems: Arc<Mutex<Vec<String>>>,
}

impl Received {
    fn add(&self, request: ExportTraceServiceRequest) {
        let mut spans = self.spans.lock().unwrap_or_else(PoisonError::into_inner);
        for resource_spans in request.resource_spans {
            let resource: BTreeMap<String, String> = resource_spans
                .resource
                .map(|resource| {
                    resource
                        .attributes
                        .iter()
                        .filter_map(|pair| {
                            let value = pair.value.as_ref()?.value.as_ref()?;
                            Some((pair.key.clone(), value_text(value)))
                        })
                        .collect()
                })
                .unwrap_or_default();
            for scope_spans in resource_spans.scope_spans {
                for span in scope_spans.spans {
                    spans.push(ReceivedSpan {
                        span,
                        resource: resource.clone(),
                    });
                }
            }
        }
    }

    fn problem(&self, problem: String) {
        self.problems
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(problem);
    }
}

/// An OTLP receiver on a loopback port, stopped when dropped.
pub struct OtlpReceiver {
    address: SocketAddr,
    received: Received,
    _stop: oneshot::Sender<()>,
}

impl OtlpReceiver {
    /// OTLP over gRPC: a `TraceService` on `127.0.0.1:0`.
    pub async fn grpc() -> OtlpReceiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a free loopback port for the OTLP receiver");
        let address = listener.local_addr().expect("the receiver's address");
        let received = Received::default();
        let (stop, stopped) = oneshot::channel::<()>();
        let service = TraceServiceServer::new(GrpcCollector(received.clone()));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async move {
                        let _ = stopped.await;
                    },
                ),
        );
        OtlpReceiver {
            address,
            received,
            _stop: stop,
        }
    }

    /// OTLP over HTTP with protobuf bodies: `POST /v1/traces` on `127.0.0.1:0`.
    pub async fn http() -> OtlpReceiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a free loopback port for the OTLP receiver");
        let address = listener.local_addr().expect("the receiver's address");
        let received = Received::default();
        let (stop, stopped) = oneshot::channel::<()>();
        let app = axum::Router::new()
            .route("/v1/traces", axum::routing::post(http_export))
            .fallback(http_elsewhere)
            .with_state(received.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        OtlpReceiver {
            address,
            received,
            _stop: stop,
        }
    }

    /// `http://127.0.0.1:PORT`: what `OTEL_EXPORTER_OTLP_ENDPOINT` is set to
    /// (without a signal path, as the standard variable is meant).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Every span received so far, in arrival order.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.received
            .spans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Requests it could not take, if any.
    pub fn problems(&self) -> Vec<String> {
        self.received
            .problems
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits (at most `limit`) until the spans received satisfy `done`, and
    /// returns them either way: the caller's assertions say what is missing.
    pub async fn spans_when(
        &self,
        limit: Duration,
        done: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let spans = self.spans();
            if done(&spans) || tokio::time::Instant::now() >= deadline {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

struct GrpcCollector(Received);

#[tonic::async_trait]
impl TraceService for GrpcCollector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.add(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn http_export(
    State(received): State<Received>,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    if content_type != "application/x-protobuf" {
        received.problem(format!(
            "POST /v1/traces with Content-Type {content_type:?}, not application/x-protobuf"
        ));
        return StatusCode::UNSUPPORTED_MEDIA_TYPE.into_response();
    }
    match ExportTraceServiceRequest::decode(body) {
        Ok(request) => {
            received.add(request);
            (
                [(header::CONTENT_TYPE, "application/x-protobuf")],
                ExportTraceServiceResponse::default().encode_to_vec(),
            )
                .into_response()
        }
        Err(err) => {
            received.problem(format!(
                "POST /v1/traces: not an ExportTraceServiceRequest: {err}"
            ));
            StatusCode::BAD_REQUEST.into_response()
        }
    }
}

async fn http_elsewhere(State(received): State<Received>, uri: Uri) -> StatusCode {
    received.problem(format!("a request to {uri}, not POST /v1/traces"));
    StatusCode::NOT_FOUND
}

/// A collector that accepts connections and never answers: the "slow"
/// collector at its worst. Stopped (and its connections closed) when dropped.
pub struct SilentCollector {
    address: SocketAddr,
    _stop: oneshot::Sender<()>,
}

impl SilentCollector {
    pub async fn start() -> SilentCollector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a free loopback port for the silent collector");
        let address = listener.local_addr().expect("its address");
        let (stop, mut stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            // Held, never read from or written to, until the collector stops.
            let mut held = Vec::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => held.push(stream),
                        Err(_) => break,
                    },
                    _ = &mut stopped => break,
                }
            }
        });
        SilentCollector {
            address,
            _stop: stop,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }
}
