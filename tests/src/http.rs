//! A minimal HTTP client for the host's admin server: one HTTP/1.0 request
//! per connection, so that the server closes the connection after the
//! response and the body needs no chunked decoding. Enough for tests on
//! loopback; not a general client.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Maximum time of one request, from connecting to the end of the body.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A response: status code, headers (names in lower case) and body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    /// Parses the body as JSON.
    ///
    /// # Panics
    ///
    /// Panics with the body when it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("response body is not JSON ({e}): {}", self.body))
    }

    /// Returns the value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// Sends `method path` to `address` with `headers` and an optional JSON
/// `body`, and reads the whole response.
///
/// # Panics
///
/// Panics when the connection fails, the response is malformed, or the
/// request takes longer than a minute.
pub async fn request(address: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&str>) -> Response {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap_or_else(|e| panic!("connect to {address}: {e}"));
        let mut head = format!("{method} {path} HTTP/1.0\r\nHost: {address}\r\n");
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        let body = body.unwrap_or("");
        if !body.is_empty() {
            head.push_str("Content-Type: application/json\r\n");
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(body.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.unwrap_or_else(|e| panic!("read the response of {method} {path}: {e}"));
        raw
    };
    let raw = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| panic!("{method} {path} got no complete response within {REQUEST_TIMEOUT:?}"));
    parse_response(&raw).unwrap_or_else(|| panic!("malformed response to {method} {path}: {}", String::from_utf8_lossy(&raw)))
}

/// Sends `raw` exactly as given, for requests the client above cannot
/// make (a body shorter than its Content-Length, headers that never end),
/// and reads until the server closes the connection. Returns the bytes
/// read: a response, or nothing when the server closed without one.
///
/// # Panics
///
/// Panics when the connection fails, or is still open after `timeout`.
pub async fn send_raw(address: SocketAddr, raw: &[u8], timeout: Duration) -> Vec<u8> {
    let mut stream = TcpStream::connect(address).await.unwrap_or_else(|e| panic!("connect to {address}: {e}"));
    stream.write_all(raw).await.unwrap_or_else(|e| panic!("send to {address}: {e}"));
    read_until_closed(&mut stream, timeout).await
}

/// Reads from `stream` until the server closes it, and returns what was
/// read. A reset counts as a close.
///
/// # Panics
///
/// Panics when the connection is still open after `timeout`, or a read
/// fails otherwise.
pub async fn read_until_closed(stream: &mut TcpStream, timeout: Duration) -> Vec<u8> {
    let mut raw = Vec::new();
    let read = async {
        let mut buffer = [0u8; 4096];
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) => break,
                Ok(n) => raw.extend_from_slice(&buffer[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("read from the admin server: {e}"),
            }
        }
    };
    if tokio::time::timeout(timeout, read).await.is_err() {
        panic!("the server did not close the connection within {timeout:?}; read so far: {:?}", String::from_utf8_lossy(&raw));
    }
    raw
}

/// Sends `GET path`.
pub async fn get(address: SocketAddr, path: &str) -> Response {
    request(address, "GET", path, &[], None).await
}

/// Parses a whole HTTP/1 response without chunked encoding; `None` when
/// it is malformed or empty.
pub fn parse_response(raw: &[u8]) -> Option<Response> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    let body = String::from_utf8(raw[split + 4..].to_vec()).ok()?;
    Some(Response { status, headers, body })
}

/// Sums every sample of metric `name` in OpenMetrics text whose labels
/// include all of `labels`. Returns `None` when no sample matches.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut sum = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if series_name != name {
            continue;
        }
        let present: Vec<(&str, &str)> = series_labels
            .split(',')
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| (k, v.trim_matches('"')))
            .collect();
        if labels.iter().all(|wanted| present.contains(wanted)) {
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("sample value in {line:?} is not a number"));
            *sum.get_or_insert(0.0) += value;
        }
    }
    sum
}
