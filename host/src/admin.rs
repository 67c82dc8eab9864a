//! The admin HTTP server: `/healthz`, `/readyz`, `/metrics` and a JSON API
//! under `/api` for pipelines, plugins, devices and dead letters.
//!
//! - [`metrics`]: the Prometheus (OpenMetrics text) exposition.
//! - [`api`]: the JSON endpoints.
//! - [`auth`]: the bearer token of the mutating endpoints.
//! - [`request`]: reading bodies, paths and query strings, with JSON
//!   errors.
//! - [`server`]: the accept loop, with its connection cap and header
//!   timeout.
//!
//! It runs only when the config has an `[admin]` table. Reading endpoints
//! need no token, so anyone who can reach the address can read them; the
//! default address is loopback.
//! Mutating endpoints (replay, purge) need `Authorization: Bearer TOKEN`,
//! where TOKEN is the value of the environment variable that
//! `admin.token_env` names; without that variable they are disabled.
//! Every error of the server is a JSON object `{"error": "..."}`.

pub mod api;
pub mod auth;
pub mod metrics;
pub mod request;
pub mod server;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde_json::json;
use tokio::sync::watch;

use crate::breaker::BreakerState;
use crate::deadletter::DeadLetterStore;
use crate::events::Events;
use crate::pipeline::PipelineSet;
use crate::reload::Reloader;
use crate::sink::Sink;
use crate::supervisor::Supervisor;

/// The parts of a running host that the admin server reads, and the token
/// of its mutating endpoints.
pub struct AdminState {
    pub pipelines: Arc<PipelineSet>,
    pub sinks: BTreeMap<String, Arc<Sink>>,
    pub reloader: Arc<Reloader>,
    pub supervisor: Arc<Supervisor>,
    /// True once the source is connected and subscribed.
    pub connected: watch::Receiver<bool>,
    pub dead_letters: Arc<DeadLetterStore>,
    pub events: Arc<Events>,
    /// Address of the broker the host uses, for the MQTT sinks of a replay.
    pub broker: SocketAddr,
    /// The bearer token; `None` disables the mutating endpoints.
    pub token: Option<String>,
    /// Name of the variable the token is read from, for error messages.
    pub token_env: String,
    /// One replay or purge of this host at a time, so that two requests
    /// never change the same dead letters at once. A replay in another
    /// process, such as `eliot dead-letters replay`, is kept apart by the
    /// claims in the store instead.
    pub mutation: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for AdminState {
    // The token must never be printed, so the derive is not used.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("broker", &self.broker)
            .field("token_env", &self.token_env)
            .field("token_set", &self.token.is_some())
            .finish_non_exhaustive()
    }
}

/// Shared state of the handlers: the host's state, the metric registry and
/// the body timeout of [`request::read_body`].
#[derive(Clone)]
struct Admin {
    state: Arc<AdminState>,
    registry: Arc<prometheus_client::registry::Registry>,
    body_read_timeout: std::time::Duration,
}

/// Binds `listen` and serves until `shutdown` turns true. Returns the bound
/// address, which differs from `listen` when its port is 0.
///
/// At most [`server::MAX_CONNECTIONS`] connections are open at once. A
/// client has [`server::HEADER_READ_TIMEOUT`] to send its headers and
/// [`request::BODY_READ_TIMEOUT`] more for the body of a mutating request.
///
/// # Errors
///
/// Fails when the address cannot be bound, for example because another
/// process uses the port.
pub async fn serve(
    listen: SocketAddr,
    state: Arc<AdminState>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        anyhow::anyhow!(
            "admin.listen: cannot listen on {listen}: {e}; choose a free port, or port 0 for any"
        )
    })?;
    let address = listener.local_addr()?;
    let registry = Arc::new(metrics::registry(state.clone()));
    let events = state.events.clone();
    let app = router(Admin {
        state,
        registry,
        body_read_timeout: request::BODY_READ_TIMEOUT,
    });
    let task = tokio::spawn(server::run(
        listener,
        app,
        server::ConnectionLimits::default(),
        events,
        shutdown,
    ));
    Ok((address, task))
}

fn router(admin: Admin) -> Router {
    // The token is checked first, before the path or the body is read.
    // Then the body is read within its time and size limits. The layer
    // added last runs first.
    let mutating = Router::new()
        .route("/api/dead-letters/:id", delete(api::delete_dead_letter))
        .route("/api/dead-letters/:id/replay", post(api::replay_one))
        .route("/api/dead-letters/replay", post(api::replay))
        .route("/api/dead-letters/purge", post(api::purge))
        .route_layer(from_fn_with_state(admin.clone(), request::read_body))
        .route_layer(from_fn_with_state(admin.clone(), auth::require_token));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/api/pipelines", get(api::pipelines))
        .route("/api/plugins", get(api::plugins))
        .route("/api/devices", get(api::devices))
        .route("/api/dead-letters", get(api::list_dead_letters))
        .route("/api/dead-letters/:id", get(api::show_dead_letter))
        .merge(mutating)
        .fallback(request::no_route)
        .method_not_allowed_fallback(request::method_not_allowed)
        .with_state(admin)
}

/// Liveness: returns 200 while the process serves requests.
async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "alive" }))
}

/// Readiness: the broker is connected and subscribed, the plugins are
/// loaded, and no sink's breaker is open. 503 otherwise, with the check
/// that failed.
async fn readyz(State(admin): State<Admin>) -> Response {
    let (ready, body) = readiness(&admin.state);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// Evaluates the readiness checks; returns whether all pass and the body.
pub fn readiness(state: &AdminState) -> (bool, serde_json::Value) {
    let broker = *state.connected.borrow();

    // The host starts only once every plugin loaded, so a running host has
    // them; the count shows what is loaded now.
    let pipelines = state.pipelines.current();
    let stages: usize = pipelines.iter().map(|p| p.stages.current().1.len()).sum();
    let plugins = !pipelines.is_empty();

    let open_sinks: Vec<&str> = state
        .sinks
        .iter()
        .filter(|(_, sink)| sink.breaker_state() == BreakerState::Open)
        .map(|(name, _)| name.as_str())
        .collect();
    let sinks = open_sinks.is_empty();

    let ready = broker && plugins && sinks;
    let body = json!({
        "ready": ready,
        "checks": {
            "broker": {
                "ok": broker,
                "detail": if broker { "connected and subscribed" } else { "not connected to the broker" },
            },
            "plugins": {
                "ok": plugins,
                "pipelines": pipelines.len(),
                "stages": stages,
            },
            "sinks": {
                "ok": sinks,
                "open_breakers": open_sinks,
            },
        },
    });
    (ready, body)
}

async fn metrics_text(State(admin): State<Admin>) -> Response {
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &admin.registry) {
        tracing::error!(error = %e, "encoding the metrics failed");
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// An error response: a status and a JSON body `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn internal(error: impl std::fmt::Display) -> Self {
        tracing::error!(error = %error, "admin request failed");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, error.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({ "error": self.message }));
        if self.status == StatusCode::UNAUTHORIZED {
            return (self.status, [(header::WWW_AUTHENTICATE, "Bearer")], body).into_response();
        }
        (self.status, body).into_response()
    }
}
