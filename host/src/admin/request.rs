//! Request extractors of the API: the request body within a time and size
//! limit, the dead-letter id of a path, and the query string. They and the
//! handlers for an unknown path or method return every failure in the
//! API's JSON error shape.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt as _;
use serde::de::DeserializeOwned;

use super::{Admin, ApiError};

/// Largest request body, the default of axum's body extractors. A
/// selection of ids needs a few bytes per id.
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

/// Time a client has to send the whole request body once the headers are
/// read. With the header timeout of the server, a request is read in full
/// within a few seconds or cut off.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Middleware of the mutating routes, after the token check: reads the
/// whole body within [`BODY_READ_TIMEOUT`] and [`MAX_BODY_BYTES`], then
/// passes the request on with the body in memory.
///
/// A body over the limit gets 413, from its Content-Length before any of
/// it is read when the header says so. A body that does not arrive in time
/// gets 408, and the connection is closed.
pub(super) async fn read_body(
    State(admin): State<Admin>,
    request: Request,
    next: Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > MAX_BODY_BYTES as u64) {
        return body_too_large().into_response();
    }

    let mut chunks = body.into_data_stream();
    let mut bytes = Vec::new();
    let read = async {
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk
                .map_err(|e| ApiError::bad_request(format!("cannot read the request body: {e}")))?;
            if bytes.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(body_too_large());
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(())
    };
    match tokio::time::timeout(admin.body_read_timeout, read).await {
        Ok(Ok(())) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Ok(Err(error)) => error.into_response(),
        Err(_) => {
            let mut response = ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} s; send the whole body at once",
                    admin.body_read_timeout.as_secs_f64()
                ),
            )
            .into_response();
            // The rest of the body may still come, so the connection cannot
            // carry another request.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            response
        }
    }
}

fn body_too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "the request body is over {MAX_BODY_BYTES} bytes; select the dead letters with a filter, or in parts"
        ),
    )
}

/// The `{id}` of a dead-letter path.
#[derive(Debug, Clone, Copy)]
pub(super) struct DeadLetterId(pub i64);

#[axum::async_trait]
impl<S: Send + Sync> FromRequestParts<S> for DeadLetterId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(text) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|rejection| {
                ApiError::bad_request(format!("invalid path: {}", rejection.body_text()))
            })?;
        text.parse().map(Self).map_err(|_| {
            ApiError::bad_request(format!(
                "dead-letter id \"{text}\" is invalid: an id is a whole number up to {}; list the ids with GET /api/dead-letters",
                i64::MAX
            ))
        })
    }
}

/// The query string, deserialized into `T`. An error names the parameter.
#[derive(Debug)]
pub(super) struct ApiQuery<T>(pub T);

#[axum::async_trait]
impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or_default();
        let deserializer =
            serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(deserializer)
            .map(Self)
            .map_err(|e| {
                let path = e.path().to_string();
                let problem = e.into_inner();
                if path == "." {
                    ApiError::bad_request(format!("invalid query string: {problem}"))
                } else {
                    ApiError::bad_request(format!(
                        "invalid query string: parameter {path}: {problem}"
                    ))
                }
            })
    }
}

/// Returns 404 for a path that no route matches.
pub(super) async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "no endpoint {method} {}; the endpoints are /healthz, /readyz, /metrics and those under /api",
            uri.path()
        ),
    )
}

/// Returns 405 for a method that a matched path does not take. axum adds
/// the `Allow` header with the methods it takes.
pub(super) async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "{method} is not allowed on {}; the Allow header lists the methods that are",
            uri.path()
        ),
    )
}
