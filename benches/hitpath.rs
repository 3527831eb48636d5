//! The two servers `scripts/bench` measures the gateway's cached hit
//! against (figures come from `wrk`; this binary only serves):
//!
//! - `bare --listen ADDR --body FILE`: an axum route that answers every
//!   `POST /graphql` with the bytes of FILE (the gateway's own answer),
//!   built with the gateway's allocator on the same runtime: the cost of
//!   the HTTP layer alone;
//! - `otlp-sink --listen ADDR`: an OTLP/gRPC trace receiver that counts
//!   spans and keeps nothing, so that span export is measured against a
//!   collector that is there and keeps up. It prints the count on SIGTERM.
//!
//! `cargo bench --bench hitpath -- bare --listen 127.0.0.1:4500 --body answer.json`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Bytes;
use axum::http::header;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .unwrap_or_else(|| panic!("{name} is required"))
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    match args.first().map(String::as_str) {
        Some("bare") => runtime.block_on(bare(value("--listen"), value("--body"))),
        Some("otlp-sink") => runtime.block_on(otlp_sink(value("--listen"))),
        // `cargo bench` alone (it passes `--bench`): nothing to serve.
        _ => eprintln!("usage: hitpath bare --listen ADDR --body FILE | otlp-sink --listen ADDR"),
    }
}

async fn bare(listen: String, body: String) {
    let body = Bytes::from(std::fs::read(&body).expect("the body file"));
    let app = axum::Router::new().route(
        "/graphql",
        post(move || {
            let body = body.clone();
            async move { ([(header::CONTENT_TYPE, "application/json")], body) }
        }),
    );
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .expect("the listen address");
    axum::serve(listener, app).await.expect("serves");
}

struct CountingCollector(Arc<AtomicU64>);

#[tonic::async_trait]
impl TraceService for CountingCollector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans: usize = request
            .into_inner()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.0.fetch_add(spans as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn otlp_sink(listen: String) {
    let count = Arc::new(AtomicU64::new(0));
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .expect("the listen address");
    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM");
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(CountingCollector(Arc::clone(
            &count,
        ))))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async move {
                terminate.recv().await;
            },
        );
    server.await.expect("serves");
    println!("spans received: {}", count.load(Ordering::Relaxed));
}
