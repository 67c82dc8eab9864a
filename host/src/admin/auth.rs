//! The bearer token of the mutating endpoints: reading it from the
//! environment, and the middleware that checks it before anything else of
//! the request is read.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{Admin, AdminState, ApiError};

/// Reads the bearer token from the variable `name`. An unset or empty
/// variable disables the mutating endpoints, which is logged. Whitespace
/// around the value is removed with a warning, because HTTP strips it from
/// header values, so a token read from a file with a final line break could
/// never match. The token itself is never logged.
pub fn read_token(name: &str) -> Option<String> {
    let value = std::env::var(name).unwrap_or_default();
    let token = value.trim();
    if token.is_empty() {
        tracing::warn!(
            variable = name,
            "admin replay and purge are disabled because the token variable is not set"
        );
        return None;
    }
    if token.len() != value.len() {
        tracing::warn!(
            variable = name,
            "the admin token variable has whitespace around its value, which was removed"
        );
    }
    Some(token.to_owned())
}

/// Returns the credentials of an `Authorization` value with the `Bearer`
/// scheme, which RFC 7235 makes case-insensitive, or `None` for another
/// scheme.
fn bearer_credentials(value: &str) -> Option<&str> {
    let (scheme, credentials) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("Bearer") {
        return None;
    }
    Some(credentials.trim_start_matches(' '))
}

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
        .and_then(bearer_credentials);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_ignores_case() {
        for value in ["Bearer abc", "bearer abc", "BEARER abc", "bEaReR  abc"] {
            assert_eq!(bearer_credentials(value), Some("abc"), "{value:?}");
        }
    }

    #[test]
    fn other_schemes_have_no_token() {
        for value in ["Basic abc", "Bearerabc", "Bearer", "abc", ""] {
            assert_eq!(bearer_credentials(value), None, "{value:?}");
        }
    }

    #[test]
    fn token_loses_surrounding_whitespace() {
        let name = "ELIOT_ADMIN_AUTH_TEST_TOKEN_WHITESPACE";
        std::env::set_var(name, "  s3cret\r\n");
        assert_eq!(read_token(name).as_deref(), Some("s3cret"));
        std::env::set_var(name, " \n");
        assert_eq!(
            read_token(name),
            None,
            "only whitespace disables the endpoints"
        );
        std::env::remove_var(name);
        assert_eq!(read_token(name), None);
    }
}
