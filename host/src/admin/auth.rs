//! The bearer token of the mutating endpoints, and the middleware that
//! checks it before anything else of the request is read.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{Admin, AdminState, ApiError};

/// Checks the bearer token of a mutating request.
///
/// # Errors
///
/// 403 when no token is configured, 401 when the header is missing or the
/// token is wrong. The token is compared in constant time and never logged.
fn authorize(state: &AdminState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = &state.token else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "mutating endpoints are disabled because {} is not set; set it to a secret token and restart the host",
                state.token_env
            ),
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    let Some(given) = given else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing bearer token; send the header \"Authorization: Bearer TOKEN\"",
        ));
    };
    use subtle::ConstantTimeEq as _;
    if bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
        Ok(())
    } else {
        if state.events.admit("admin-wrong-token") {
            tracing::warn!("admin request rejected: wrong bearer token");
        }
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "wrong bearer token",
        ))
    }
}

/// Middleware of the mutating routes: rejects a request without the right
/// token before its path parameters or its body are read, so that such a
/// request gets 401 whatever it sends.
pub(super) async fn require_token(
    State(admin): State<Admin>,
    request: Request,
    next: Next,
) -> Response {
    match authorize(&admin.state, request.headers()) {
        Ok(()) => next.run(request).await,
        Err(error) => error.into_response(),
    }
}
