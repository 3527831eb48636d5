//! GraphiQL, served by the gateway itself: the page (`GET /graphql` with
//! `Accept: text/html`) and every file it loads, embedded in the binary, so
//! that it works where browsers reach nothing but the gateway.
//!
//! The files are vendored from npm under `assets/graphiql/` (pinned versions,
//! their licences, a gzip copy of each: `scripts/vendor-graphiql` refreshes
//! them); the page and its start-up script are ours, beside this file. Each
//! file is served at `/graphiql/{hash}/{name}`, `hash` being the start of its
//! SHA-256, so it can be cached for a year: a new version has a new path. The
//! page itself is revalidated on every visit, and its Content-Security-Policy
//! lets the browser load nothing from any other origin.

use std::sync::{LazyLock, OnceLock};

use axum::Router;
use axum::body::Body;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use sha2::{Digest, Sha256};

/// The versions `scripts/vendor-graphiql` pins (a test keeps them equal).
pub const GRAPHIQL_VERSION: &str = "4.1.2";
pub const REACT_VERSION: &str = "18.3.1";

/// Where the files are served; also the route's label in metrics.
pub const ASSET_ROUTE: &str = "/graphiql/{version}/{file}";

/// The contract's example, which the page opens with, ready to run.
const EXAMPLE_QUERY: &str = "query Panel($input: AggregateInput!) {
  aggregate(input: $input) {
    rows
    cache {
      status
    }
  }
}
";
const EXAMPLE_VARIABLES: &str = r#"{
  "input": {
    "customer": "acme",
    "dateRange": {"from": "2025-01-01", "to": "2025-01-31"},
    "measures": ["Sales.revenue", "Sales.orders"],
    "dimensions": ["Sales.region"],
    "granularity": "DAY"
  }
}"#;

const PAGE_TEMPLATE: &str = include_str!("graphiql/page.html");

/// `script-src 'self'` is why the start-up script is a file of its own;
/// `style-src 'unsafe-inline'` is for the style attributes GraphiQL's
/// components set. `connect-src 'self'` covers the page's own `ws:`/`wss:`
/// address too (CSP Level 3).
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self' data:; \
     connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

const IMMUTABLE: &str = "public, max-age=31536000, immutable";

/// One file the page loads, embedded in the binary.
struct File {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
    /// The same bytes, gzip-compressed (`gzip -9 -n`), for browsers that accept it.
    gzip: Option<&'static [u8]>,
}

macro_rules! vendored {
    ($name:literal, $content_type:expr) => {
        File {
            name: $name,
            content_type: $content_type,
            body: include_bytes!(concat!("../../assets/graphiql/", $name)),
            gzip: Some(include_bytes!(concat!(
                "../../assets/graphiql/",
                $name,
                ".gz"
            ))),
        }
    };
}

const JAVASCRIPT: &str = "text/javascript; charset=utf-8";

static FILES: [File; 5] = [
    vendored!("graphiql.min.css", "text/css; charset=utf-8"),
    vendored!("react.production.min.js", JAVASCRIPT),
    vendored!("react-dom.production.min.js", JAVASCRIPT),
    vendored!("graphiql.min.js", JAVASCRIPT),
    // Ours, and small: no compressed copy.
    File {
        name: "init.js",
        content_type: JAVASCRIPT,
        body: include_bytes!("graphiql/init.js"),
        gzip: None,
    },
];

/// Each file's version (the first 16 hex digits of its SHA-256), computed on
/// first use: hashing 1.6 MB is work a gateway that never serves the page
/// need not do at start-up.
static VERSIONS: LazyLock<Vec<String>> = LazyLock::new(|| {
    FILES
        .iter()
        .map(|file| {
            let digest = Sha256::digest(file.body);
            digest[..8].iter().map(|b| format!("{b:02x}")).collect()
        })
        .collect()
});

/// Each file with the path it is served at.
fn served() -> impl Iterator<Item = (&'static File, String)> {
    FILES
        .iter()
        .zip(VERSIONS.iter())
        .map(|(file, version)| (file, format!("/graphiql/{version}/{}", file.name)))
}

/// The routes of the files; mounted only while GraphiQL is on.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new().route(ASSET_ROUTE, get(serve_file))
}

async fn serve_file(Path((version, name)): Path<(String, String)>, headers: HeaderMap) -> Response {
    let Some(index) = FILES
        .iter()
        .position(|file| file.name == name)
        .filter(|&index| VERSIONS[index] == version)
    else {
        // Also an old version's path: its bytes are no longer in this binary.
        return StatusCode::NOT_FOUND.into_response();
    };
    let file = &FILES[index];
    let mut response = Response::new(Body::empty());
    let response_headers = response.headers_mut();
    response_headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(file.content_type),
    );
    response_headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(IMMUTABLE));
    response_headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    response_headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    *response.body_mut() = match file.gzip.filter(|_| accepts_gzip(&headers)) {
        Some(compressed) => {
            response
                .headers_mut()
                .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            Body::from(compressed)
        }
        None => Body::from(file.body),
    };
    response
}

/// Whether `Accept-Encoding` allows gzip: named (or `x-gzip`) with a `q`
/// above 0, or not named and `*` allowed.
fn accepts_gzip(headers: &HeaderMap) -> bool {
    let mut gzip = None;
    let mut any = None;
    let codings = headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','));
    for coding in codings {
        let mut parts = coding.split(';');
        let name = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|param| param.split_once('='))
            .find(|(param, _)| param.trim().eq_ignore_ascii_case("q"))
            .map_or(1.0, |(_, value)| value.trim().parse::<f32>().unwrap_or(0.0));
        match name.as_str() {
            "gzip" | "x-gzip" => gzip = Some(q > 0.0),
            "*" => any = Some(q > 0.0),
            _ => {}
        }
    }
    gzip.or(any).unwrap_or(false)
}

/// What the Headers tab starts with: which credential this gateway reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialHint {
    /// Authentication is off: an empty Headers tab.
    None,
    /// JWT bearer tokens.
    Bearer,
    /// API keys only.
    ApiKey,
}

impl CredentialHint {
    fn headers(self) -> &'static str {
        match self {
            CredentialHint::None => "",
            CredentialHint::Bearer => "{\n  \"Authorization\": \"Bearer <JWT>\"\n}",
            CredentialHint::ApiKey => "{\n  \"x-api-key\": \"<API key>\"\n}",
        }
    }
}

/// The page, rendered on first use (it names the files by their versions).
pub struct GraphiqlPage {
    credential: CredentialHint,
    html: OnceLock<String>,
}

impl GraphiqlPage {
    pub fn new(credential: CredentialHint) -> GraphiqlPage {
        GraphiqlPage {
            credential,
            html: OnceLock::new(),
        }
    }

    /// The answer to a browser's `GET /graphql`.
    pub fn response(&self) -> Response {
        let html = self.html.get_or_init(|| render(self.credential));
        (
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/html; charset=utf-8"),
                ),
                // Revalidated each time, so that a new version's page (and
                // with it the new files' paths) is seen at once.
                (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
                // The same URL answers JSON to other clients.
                (header::VARY, HeaderValue::from_static("accept")),
                (
                    header::CONTENT_SECURITY_POLICY,
                    HeaderValue::from_static(CONTENT_SECURITY_POLICY),
                ),
                (
                    header::X_CONTENT_TYPE_OPTIONS,
                    HeaderValue::from_static("nosniff"),
                ),
                (
                    header::REFERRER_POLICY,
                    HeaderValue::from_static("no-referrer"),
                ),
            ],
            html.clone(),
        )
            .into_response()
    }
}

fn render(credential: CredentialHint) -> String {
    let settings = json!({
        "query": EXAMPLE_QUERY,
        "variables": EXAMPLE_VARIABLES,
        "headers": credential.headers(),
    });
    // Inside <script>, `</script>` would end the block: no `<` goes in raw.
    let settings = settings.to_string().replace('<', "\\u003c");
    let mut html = PAGE_TEMPLATE
        .replace("{{graphiql_version}}", GRAPHIQL_VERSION)
        .replace("{{react_version}}", REACT_VERSION)
        .replace("{{settings}}", &settings);
    for (file, path) in served() {
        // Relative to `/graphql`: the page keeps working under a path prefix.
        let placeholder = format!("{{{{{}}}}}", file.name);
        html = html.replace(&placeholder, &path[1..]);
    }
    html
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(accept_encoding: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in accept_encoding {
            headers.append(
                header::ACCEPT_ENCODING,
                HeaderValue::from_str(value).expect("a header value"),
            );
        }
        headers
    }

    /// Accept-Encoding is read as RFC 9110 says: named codings, `q`, `*`.
    #[test]
    fn gzip_is_chosen_by_accept_encoding() {
        let cases: &[(&[&str], bool)] = &[
            (&[], false),
            (&["identity"], false),
            (&["gzip"], true),
            (&["GZip"], true),
            (&["x-gzip"], true),
            (&["gzip, deflate, br, zstd"], true),
            (&["br;q=1.0, gzip;q=0.8"], true),
            (&["gzip;q=0"], false),
            (&["gzip; q=0.000"], false),
            (&["*"], true),
            (&["*;q=0"], false),
            (&["*, gzip;q=0"], false),
            (&["br", "gzip"], true),
        ];
        for (values, expected) in cases {
            assert_eq!(accepts_gzip(&headers(values)), *expected, "{values:?}");
        }
    }

    /// CRC-32 (IEEE), as gzip's trailer holds it.
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &byte in bytes {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
            }
        }
        !crc
    }

    /// Each `.gz` holds its file as it is now: gzip's trailer (CRC-32 and
    /// length of the uncompressed bytes) matches, so a file refreshed without
    /// its compressed copy fails here rather than in some browser.
    #[test]
    fn compressed_copies_match_their_files() {
        for file in &FILES {
            let Some(gzip) = file.gzip else { continue };
            assert_eq!(&gzip[..3], &[0x1f, 0x8b, 8], "{}.gz is not gzip", file.name);
            let trailer = &gzip[gzip.len() - 8..];
            let crc = u32::from_le_bytes(trailer[..4].try_into().expect("4 bytes"));
            let size = u32::from_le_bytes(trailer[4..].try_into().expect("4 bytes"));
            assert_eq!(size as usize, file.body.len(), "{}.gz: length", file.name);
            assert_eq!(crc, crc32(file.body), "{}.gz: CRC-32", file.name);
        }
    }

    /// The versions named here are the ones the vendoring script pinned.
    #[test]
    fn versions_are_the_vendored_ones() {
        let provenance = include_str!("../../assets/graphiql/README.md");
        assert!(provenance.contains(&format!("graphiql@{GRAPHIQL_VERSION}")));
        assert!(provenance.contains(&format!("react@{REACT_VERSION}")));
        assert!(provenance.contains(&format!("react-dom@{REACT_VERSION}")));
    }

    /// The page names every file by its served path, relative, and nothing
    /// else: no placeholder is left, no other host appears.
    #[test]
    fn the_page_loads_only_its_own_files() {
        let html = render(CredentialHint::Bearer);
        assert!(!html.contains("{{"), "{html}");
        for (_, path) in served() {
            let reference = format!("\"{}\"", &path[1..]);
            assert!(html.contains(&reference), "{reference} in {html}");
        }
        for attribute in ["src=\"", "href=\""] {
            for (_, rest) in html.match_indices(attribute).map(|(i, _)| html.split_at(i)) {
                let target = &rest[attribute.len()..];
                assert!(
                    target.starts_with("graphiql/") || target.starts_with("data:"),
                    "{}",
                    &target[..target.len().min(80)]
                );
            }
        }
    }

    /// The settings block is JSON that cannot end its `<script>` early, and
    /// carries the contract's example and the credential hint.
    #[test]
    fn the_settings_block_is_safe_json() {
        let html = render(CredentialHint::Bearer);
        let start = html.find("type=\"application/json\">").expect("the block") + 24;
        let end = start + html[start..].find("</script>").expect("its end");
        let block = &html[start..end];
        assert!(!block.contains('<'), "{block}");
        let settings: serde_json::Value = serde_json::from_str(block).expect("JSON");
        assert_eq!(settings["query"], EXAMPLE_QUERY);
        assert!(
            settings["headers"]
                .as_str()
                .is_some_and(|h| h.contains("Bearer <JWT>"))
        );
        let variables: serde_json::Value =
            serde_json::from_str(settings["variables"].as_str().expect("a string"))
                .expect("variables are JSON");
        assert_eq!(variables["input"]["customer"], "acme");
        assert_eq!(variables["input"]["granularity"], "DAY");
        assert!(
            !render(CredentialHint::None).contains("Bearer"),
            "no hint without authentication"
        );
    }
}
