//! The JSON API: pipelines, plugins, devices, and dead letters with list,
//! show, replay and purge. Replay and purge reuse the store and the replay
//! of the `eliot dead-letters` command.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::request::{ApiQuery, DeadLetterId};
use super::{Admin, ApiError};
use crate::deadletter::replay::{self, LetterOutcome, LettersNotFound, ReplayOptions, Selection};
use crate::deadletter::{FailureKind, ListFilter};
use crate::wasm::LoadedPlugin;

/// Letters a list returns unless the request sets `limit`.
const DEFAULT_LIMIT: usize = 100;
/// Most letters one list returns; page with `after_id` for more.
const MAX_LIMIT: usize = 1000;

type ApiResult = Result<Json<Value>, ApiError>;

/// `GET /api/pipelines`: every running pipeline with its stages, the
/// plugin version each stage runs, and its breaker state.
pub(super) async fn pipelines(State(admin): State<Admin>) -> Json<Value> {
    let pipelines: Vec<Value> = admin
        .state
        .pipelines
        .current()
        .iter()
        .map(|pipeline| {
            let stages: Vec<Value> = pipeline
                .stages
                .current()
                .1
                .iter()
                .map(|stage| {
                    let plugin = stage.slot.current().1;
                    json!({
                        "name": stage.name,
                        "plugin": plugin.info.name,
                        "version": plugin.info.version,
                        "breaker": stage.breaker_state().as_str(),
                    })
                })
                .collect();
            let config = &pipeline.config;
            json!({
                "name": config.name,
                "topics": config.topics.iter().map(|t| t.as_str()).collect::<Vec<_>>(),
                "qos": config.qos as u8,
                "workers": config.workers,
                "stages": stages,
                "sinks": config.sinks,
                "counts": counts(&pipeline.stats.snapshot()),
            })
        })
        .collect();
    Json(json!({ "pipelines": pipelines }))
}

fn counts(stats: &crate::stats::StatsSnapshot) -> Value {
    json!({
        "received": stats.received,
        "delivered": stats.delivered,
        "records_out": stats.records_out,
        "dropped": stats.dropped,
        "dead_lettered": stats.dead_lettered,
    })
}

/// `GET /api/plugins`: every loaded plugin with its file, the hash of the
/// file, when it was loaded, and its limits.
pub(super) async fn plugins(State(admin): State<Admin>) -> Json<Value> {
    let mut plugins: BTreeMap<String, Arc<LoadedPlugin>> = BTreeMap::new();
    for pipeline in admin.state.pipelines.current().iter() {
        for stage in pipeline.stages.current().1.iter() {
            let plugin = stage.slot.current().1;
            plugins.insert(plugin.name.clone(), plugin);
        }
    }
    let plugins: Vec<Value> = plugins
        .values()
        .map(|plugin| {
            json!({
                "name": plugin.name,
                "reports_name": plugin.info.name,
                "version": plugin.info.version,
                "file": plugin.path.display().to_string(),
                // The host's change-detection hash of the file's bytes. It
                // distinguishes versions but is no checksum to verify against.
                "hash": format!("{:016x}", plugin.digest),
                "loaded_at": crate::clock::rfc3339_ms(plugin.loaded_at_ms),
                "limits": {
                    "memory_mib": plugin.limits.memory_mib,
                    "call_budget_ms": plugin.limits.call_budget_ms,
                },
                "max_retries": plugin.max_retries,
                "breaker": {
                    "failure_threshold": plugin.breaker.failure_threshold,
                    "cool_down_ms": plugin.breaker.cool_down_ms,
                },
            })
        })
        .collect();
    Json(json!({ "plugins": plugins }))
}

/// `GET /api/devices`: every device seen since the host started.
///
/// NOTE: returns the whole registry in one response, which is large for a
/// fleet of very many devices.
pub(super) async fn devices(State(admin): State<Admin>) -> Json<Value> {
    let devices: Vec<Value> = admin
        .state
        .events
        .fleet
        .snapshot()
        .into_iter()
        .map(|(id, device)| {
            json!({
                "id": id,
                "first_seen": crate::clock::rfc3339_ms(device.first_seen_ms),
                "last_seen": crate::clock::rfc3339_ms(device.last_seen_ms),
                "messages": device.messages,
                "online": device.status.map(|s| s == crate::fleet::DeviceStatus::Online),
                "status_changed_at": device.status_changed_ms.map(crate::clock::rfc3339_ms),
            })
        })
        .collect();
    Json(json!({ "devices": devices }))
}

/// Query parameters and body fields that select dead letters.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FilterParams {
    pipeline: Option<String>,
    stage: Option<String>,
    kind: Option<String>,
    topic_prefix: Option<String>,
    limit: Option<usize>,
    after_id: Option<i64>,
}

impl FilterParams {
    /// Converts to a store filter; `default_limit` applies when no limit is
    /// given.
    fn to_filter(&self, default_limit: Option<usize>) -> Result<ListFilter, ApiError> {
        let kind = match &self.kind {
            None => None,
            Some(text) => Some(
                FailureKind::ALL
                    .into_iter()
                    .find(|kind| kind.as_str() == text)
                    .ok_or_else(|| {
                        let known: Vec<&str> =
                            FailureKind::ALL.iter().map(|k| k.as_str()).collect();
                        ApiError::bad_request(format!(
                            "kind \"{text}\" is not a failure kind; use one of {}",
                            known.join(", ")
                        ))
                    })?,
            ),
        };
        let limit = match self.limit.or(default_limit) {
            Some(0) => {
                return Err(ApiError::bad_request(
                    "limit 0 selects nothing; use a limit from 1 to 1000",
                ))
            }
            Some(limit) if limit > MAX_LIMIT => {
                return Err(ApiError::bad_request(format!(
                    "limit {limit} is above {MAX_LIMIT}; page with after_id instead"
                )))
            }
            limit => limit,
        };
        Ok(ListFilter {
            pipeline: self.pipeline.clone(),
            stage: self.stage.clone(),
            kind,
            topic_prefix: self.topic_prefix.clone(),
            limit,
            after_id: self.after_id,
        })
    }
}

/// `GET /api/dead-letters?pipeline=&stage=&kind=&topic_prefix=&limit=&after_id=`.
pub(super) async fn list_dead_letters(
    State(admin): State<Admin>,
    ApiQuery(params): ApiQuery<FilterParams>,
) -> ApiResult {
    let mut filter = params.to_filter(Some(DEFAULT_LIMIT))?;
    let store = &admin.state.dead_letters;
    // Reading one row more than the limit shows whether another page
    // exists, so a page that ends exactly at the last letter has no next
    // page.
    let limit = filter.limit;
    filter.limit = limit.map(|limit| limit + 1);
    let mut letters = store.list(&filter).map_err(ApiError::internal)?;
    let next_after_id = match limit {
        Some(limit) if letters.len() > limit => {
            letters.truncate(limit);
            letters.last().map(|last| last.id)
        }
        _ => None,
    };
    let letters: Vec<Value> = letters.iter().map(|letter| letter.to_json()).collect();
    Ok(Json(json!({
        "dead_letters": letters,
        "next_after_id": next_after_id,
    })))
}

/// `GET /api/dead-letters/{id}`.
pub(super) async fn show_dead_letter(
    State(admin): State<Admin>,
    DeadLetterId(id): DeadLetterId,
) -> ApiResult {
    match admin
        .state
        .dead_letters
        .get(id)
        .map_err(ApiError::internal)?
    {
        Some(letter) => Ok(Json(letter.to_json())),
        None => Err(not_found(id)),
    }
}

fn not_found(id: i64) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("dead letter {id} not found; list them with GET /api/dead-letters"),
    )
}

/// Builds the 404 error for a selection of ids of which `missing` are not
/// in the store, so nothing was done. It is the client's mistake, so it is
/// not logged.
fn letters_not_found(missing: &[i64], done: &str) -> ApiError {
    let ids: Vec<String> = missing.iter().map(i64::to_string).collect();
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "dead letters not found: {}; nothing was {done}; list them with GET /api/dead-letters",
            ids.join(", ")
        ),
    )
}

/// Body of replay and purge: exactly one of `ids`, `filter` or `all`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SelectionBody {
    ids: Option<Vec<i64>>,
    filter: Option<FilterParams>,
    #[serde(default)]
    all: bool,
}

impl SelectionBody {
    fn parse(body: &[u8]) -> Result<Self, ApiError> {
        serde_json::from_slice(body).map_err(|e| {
            ApiError::bad_request(format!(
                "invalid request body: {e}; send JSON such as {{\"ids\": [1, 2]}}"
            ))
        })
    }

    fn to_selection(&self) -> Result<Selection, ApiError> {
        let usage = "send exactly one of {\"ids\": [1, 2]}, {\"filter\": {\"pipeline\": \"NAME\"}} or {\"all\": true}";
        match (&self.ids, &self.filter, self.all) {
            (Some(ids), None, false) if !ids.is_empty() => Ok(Selection::ids(ids.clone())),
            (Some(_), None, false) => {
                Err(ApiError::bad_request(format!("\"ids\" is empty; {usage}")))
            }
            (None, Some(filter), false) => {
                let filter = filter.to_filter(None)?;
                if filter.matches_everything() {
                    return Err(ApiError::bad_request(
                        "the filter selects every dead letter; set pipeline, stage, kind or topic_prefix, or send {\"all\": true}",
                    ));
                }
                Ok(Selection::Filter(filter))
            }
            (None, None, true) => Ok(Selection::Filter(ListFilter::default())),
            _ => Err(ApiError::bad_request(usage)),
        }
    }
}

/// `POST /api/dead-letters/replay`: sends the selected dead letters through
/// their pipeline again, as `eliot dead-letters replay` does. Needs the
/// bearer token, which [`super::auth::require_token`] checks.
pub(super) async fn replay(State(admin): State<Admin>, body: axum::body::Bytes) -> ApiResult {
    let selection = SelectionBody::parse(&body)?.to_selection()?;
    run_replay(&admin, &selection).await
}

/// `POST /api/dead-letters/{id}/replay`. Needs the bearer token.
pub(super) async fn replay_one(
    State(admin): State<Admin>,
    DeadLetterId(id): DeadLetterId,
) -> ApiResult {
    run_replay(&admin, &Selection::Ids(vec![id])).await
}

/// Replays `selection`, one replay of this host at a time.
///
/// # Errors
///
/// 404 when a selected id is not in the store, and 422 with the reason
/// when the replay fails, for example because a plugin does not load.
async fn run_replay(admin: &Admin, selection: &Selection) -> ApiResult {
    let state = &admin.state;
    let _one_at_a_time = state.mutation.lock().await;
    let config = state.reloader.config().await;

    // The replay's MQTT sinks publish to the broker the host is connected
    // to, also when `mqtt.broker` is "embedded".
    let options = ReplayOptions {
        broker: Some(state.broker.to_string()),
        skip_mqtt_sinks: false,
    };

    let mut outcomes = Vec::new();
    let summary = replay::replay(
        &config,
        &state.dead_letters,
        selection,
        &options,
        |id, outcome| outcomes.push(outcome_json(id, outcome)),
    )
    .await
    .map_err(|e| {
        if let Some(not_found) = e.downcast_ref::<LettersNotFound>() {
            return letters_not_found(&not_found.ids, "replayed");
        }
        let text = format!("{e:#}");
        tracing::error!(error = %text, "dead-letter replay through the admin API failed");
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, text)
    })?;
    tracing::info!(
        delivered = summary.delivered,
        dropped = summary.dropped,
        failed_again = summary.failed_again,
        skipped = summary.skipped,
        "dead letters replayed through the admin API"
    );
    Ok(Json(json!({
        "delivered": summary.delivered,
        "dropped": summary.dropped,
        "failed_again": summary.failed_again,
        "skipped": summary.skipped,
        "letters": outcomes,
    })))
}

fn outcome_json(id: i64, outcome: &LetterOutcome) -> Value {
    match outcome {
        LetterOutcome::Delivered { records } => {
            json!({ "id": id, "outcome": "delivered", "records": records })
        }
        LetterOutcome::Dropped { stage, reason } => {
            json!({ "id": id, "outcome": "dropped", "stage": stage, "reason": reason })
        }
        LetterOutcome::FailedAgain {
            stage,
            kind,
            reason,
            replay_count,
        } => json!({
            "id": id,
            "outcome": "failed-again",
            "stage": stage,
            "kind": kind.as_str(),
            "reason": reason,
            "replay_count": replay_count,
        }),
        LetterOutcome::Skipped { reason } => {
            json!({ "id": id, "outcome": "skipped", "reason": reason })
        }
    }
}

/// `POST /api/dead-letters/purge`: deletes the selected dead letters.
/// Needs the bearer token. A selection by ids deletes nothing unless every
/// id exists, as `eliot dead-letters purge` does.
pub(super) async fn purge(State(admin): State<Admin>, body: axum::body::Bytes) -> ApiResult {
    let selection = SelectionBody::parse(&body)?.to_selection()?;
    let state = &admin.state;
    let _one_at_a_time = state.mutation.lock().await;
    let purged = match &selection {
        Selection::Ids(ids) => {
            let missing = state
                .dead_letters
                .missing(ids)
                .map_err(ApiError::internal)?;
            if !missing.is_empty() {
                return Err(letters_not_found(&missing, "purged"));
            }
            state.dead_letters.delete(ids)
        }
        Selection::Filter(filter) => state.dead_letters.purge(filter),
    }
    .map_err(ApiError::internal)?;
    tracing::info!(purged, "dead letters purged through the admin API");
    Ok(Json(json!({ "purged": purged })))
}

/// `DELETE /api/dead-letters/{id}`. Needs the bearer token.
pub(super) async fn delete_dead_letter(
    State(admin): State<Admin>,
    DeadLetterId(id): DeadLetterId,
) -> ApiResult {
    let state = &admin.state;
    let _one_at_a_time = state.mutation.lock().await;
    match state
        .dead_letters
        .delete(&[id])
        .map_err(ApiError::internal)?
    {
        0 => Err(not_found(id)),
        purged => {
            tracing::info!(id, "dead letter purged through the admin API");
            Ok(Json(json!({ "purged": purged })))
        }
    }
}
