//! The request body limit, with a 413 the client can read.

use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Request, State};
use axum::http::{StatusCode, Version, header};
use axum::middleware::Next;
use axum::response::Response;
use futures_util::{Stream, StreamExt};
use tokio::time::Instant;

use super::{request_error, request_refused};

/// The request body limit and how a refused body is drained.
#[derive(Debug, Clone, Copy)]
pub(super) struct BodyLimit {
    pub(super) max_bytes: usize,
    pub(super) linger: Linger,
}

/// How much of a refused body is read and thrown away, at most, before the
/// 413 is sent (see [`limit_body`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct Linger {
    /// Longest the whole drain may take.
    time: Duration,
    /// Longest the client may send nothing.
    idle: Duration,
    /// Most bytes read and thrown away.
    max_bytes: u64,
}

impl Linger {
    /// nginx lingers up to 30 s with 5 s pauses; a gateway's clients are on
    /// fast paths, and a few seconds bound what a slow one can hold. 64 MiB
    /// covers any body a GraphQL client sends by mistake; past that, draining
    /// would cost more than the answer is worth.
    pub(super) const DEFAULT: Linger = Linger {
        time: Duration::from_secs(5),
        idle: Duration::from_secs(2),
        max_bytes: 64 * 1024 * 1024,
    };
}

/// Reads request bodies in full before any handler runs, up to the limit,
/// and refuses bigger ones with a 413 the client can read.
///
/// Most clients write a whole body before they read anything. A server that
/// answers early and closes the connection with unread bytes in its socket
/// makes the kernel send a reset, which destroys the answer on its way (the
/// client gets "connection reset" or "broken pipe", never the 413); and a
/// keep-alive client may send its next request down the dying connection.
/// So, like nginx's lingering close, the rest of a refused body is read and
/// thrown away (within [`Linger`]'s bounds: never kept, so memory stays flat),
/// then the 413 goes out with `Connection: close`, and the connection ends
/// with a clean close the client reads to the end. Two cases are refused at
/// once: a client waiting on `Expect: 100-continue` has sent none of the body
/// and never will, and a `Content-Length` too large to drain would be cut
/// anyway. HTTP/2 needs none of this: a refused stream is reset on its own,
/// the connection and its other streams go on.
pub(super) async fn limit_body(
    State(limit): State<BodyLimit>,
    request: Request,
    next: Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let size = body.size_hint();
    if size.upper() == Some(0) {
        return next.run(Request::from_parts(parts, body)).await;
    }
    let http1 = parts.version <= Version::HTTP_11;
    // The announced `Content-Length`, when there is one; 0 when chunked.
    let announced = size.lower();
    let mut chunks = body.into_data_stream();
    if announced > limit.max_bytes as u64 {
        let waits_for_continue = parts
            .headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if http1 && !waits_for_continue && announced <= limit.linger.max_bytes {
            linger(chunks, limit.linger).await;
        }
        return too_large(limit.max_bytes, http1);
    }
    let mut buffered = bytes::BytesMut::with_capacity(announced as usize);
    while let Some(chunk) = chunks.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(err) => {
                return request_error(&format!("the request body could not be read: {err}"));
            }
        };
        if buffered.len() + chunk.len() > limit.max_bytes {
            if http1 {
                linger(chunks, limit.linger).await;
            }
            return too_large(limit.max_bytes, http1);
        }
        buffered.extend_from_slice(&chunk);
    }
    next.run(Request::from_parts(parts, Body::from(buffered.freeze())))
        .await
}

/// HTTP 413; on HTTP/1, the connection closes after it.
fn too_large(max_bytes: usize, http1: bool) -> Response {
    let mut response = request_refused(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!(
            "the request body is larger than the {max_bytes} bytes this gateway accepts (MAX_BODY_BYTES)"
        ),
    );
    if http1 {
        response.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
    }
    response
}

/// How the drain of a refused body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lingered {
    /// The body ended: the connection can close cleanly.
    Drained,
    /// The client stopped sending for [`Linger::idle`].
    Stalled,
    /// [`Linger::time`] passed.
    TooLong,
    /// More than [`Linger::max_bytes`] came.
    TooBig,
    /// The body broke off (the client closed, or bad chunked framing).
    Broken,
}

/// Reads and throws away the rest of a refused body, within `bounds`.
async fn linger<S, E>(mut chunks: S, bounds: Linger) -> Lingered
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
{
    let deadline = Instant::now() + bounds.time;
    let mut discarded: u64 = 0;
    let outcome = loop {
        let wait = deadline.min(Instant::now() + bounds.idle);
        match tokio::time::timeout_at(wait, chunks.next()).await {
            Ok(None) => break Lingered::Drained,
            Ok(Some(Err(_))) => break Lingered::Broken,
            Ok(Some(Ok(chunk))) => {
                discarded += chunk.len() as u64;
                if discarded > bounds.max_bytes {
                    break Lingered::TooBig;
                }
            }
            Err(_) if Instant::now() >= deadline => break Lingered::TooLong,
            Err(_) => break Lingered::Stalled,
        }
    };
    tracing::debug!(?outcome, discarded, "drained a request body over the limit");
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: Linger = Linger {
        time: Duration::from_secs(10),
        idle: Duration::from_millis(50),
        max_bytes: 1024,
    };

    fn chunk(n: usize) -> Result<Bytes, std::io::Error> {
        Ok(Bytes::from(vec![b'x'; n]))
    }

    /// A body that ends within the bounds is read to its end.
    #[tokio::test]
    async fn a_body_that_ends_is_drained() {
        let body = futures_util::stream::iter((0..10).map(|_| chunk(100)));
        assert_eq!(linger(body, BOUNDS).await, Lingered::Drained);
    }

    /// More than `max_bytes` ends the drain, however fast they come.
    #[tokio::test]
    async fn an_endless_body_is_cut_after_max_bytes() {
        let body = futures_util::stream::repeat_with(|| chunk(100));
        assert_eq!(linger(body, BOUNDS).await, Lingered::TooBig);
    }

    /// A client silent for `idle` is not waited for any longer.
    #[tokio::test]
    async fn a_client_that_stops_sending_is_not_waited_for() {
        let body = futures_util::stream::iter([chunk(100)]).chain(futures_util::stream::pending());
        assert_eq!(linger(body, BOUNDS).await, Lingered::Stalled);
    }

    /// A client that keeps sending a byte now and then is cut after `time`.
    #[tokio::test]
    async fn a_slow_trickle_is_cut_after_the_linger_time() {
        let bounds = Linger {
            time: Duration::from_millis(200),
            idle: Duration::from_secs(10),
            max_bytes: u64::MAX,
        };
        let body = futures_util::stream::unfold((), |()| async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Some((chunk(1), ()))
        });
        assert_eq!(linger(Box::pin(body), bounds).await, Lingered::TooLong);
    }

    /// A body that breaks off ends the drain at once.
    #[tokio::test]
    async fn a_body_that_breaks_off_ends_the_drain() {
        let body = futures_util::stream::iter([
            chunk(100),
            Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)),
        ]);
        assert_eq!(linger(body, BOUNDS).await, Lingered::Broken);
    }
}
