//! Events that are both logged and counted. Each function here writes the
//! log line and bumps the counter together, so that the log and `/metrics`
//! never disagree. The rest of the host calls these functions instead of
//! logging such an event itself.
//!
//! Repeated warnings are rate-limited per key (see [`RateLimiter`]); the
//! counters still count every event.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

use crate::deadletter::DeadLetter;
use crate::fleet::{self, DeviceStatus, Fleet, StatusChange};
use crate::stats::{self, PipelineStats};

/// Label set of a metric: label names and their values.
pub type Labels = Vec<(&'static str, String)>;

/// A histogram family whose histograms share the stage-latency buckets.
pub type LatencyFamily = Family<Labels, Histogram, fn() -> Histogram>;

/// Upper bounds of the stage latency buckets, in seconds: from 10 us (a
/// plain plugin call) up to the default call budget of one second.
const LATENCY_BUCKETS: [f64; 13] = [
    0.000_01, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.05, 0.1, 0.5,
    1.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// The counters and the device registry of one host, and the limiter of
/// its repeated warnings.
#[derive(Debug)]
pub struct Events {
    pub fleet: Fleet,
    /// Filter of the device status topic, which the source subscribes to.
    pub status_topic: Option<crate::topic::TopicFilter>,
    /// Input messages a stage dropped on purpose, by pipeline and stage.
    pub dropped: Family<Labels, Counter>,
    /// Input messages stored as dead letters, by pipeline, stage and kind.
    pub dead_lettered: Family<Labels, Counter>,
    /// Messages handed to a stage, by pipeline and stage.
    pub stage_in: Family<Labels, Counter>,
    /// Messages a stage passed on (a fan-out counts each output).
    pub stage_out: Family<Labels, Counter>,
    /// Time a message spent in a stage, retries included.
    pub stage_duration: LatencyFamily,
    /// Device status changes, by new status.
    pub device_status: Family<Labels, Counter>,
    /// Log lines left out by the rate limiter.
    pub suppressed: Counter,
    /// Messages the broker delivered that no pipeline's filter matches.
    pub unrouted: Counter,
    limiter: Mutex<RateLimiter>,
}

impl Default for Events {
    fn default() -> Self {
        Self {
            fleet: Fleet::default(),
            status_topic: None,
            dropped: Family::default(),
            dead_lettered: Family::default(),
            stage_in: Family::default(),
            stage_out: Family::default(),
            stage_duration: Family::new_with_constructor(latency_histogram),
            device_status: Family::default(),
            suppressed: Counter::default(),
            unrouted: Counter::default(),
            limiter: Mutex::new(RateLimiter::new(LOG_WINDOW, LOG_BURST)),
        }
    }
}

/// Window of the log rate limiter.
const LOG_WINDOW: Duration = Duration::from_secs(10);
/// Lines per key and window the rate limiter lets through.
const LOG_BURST: u32 = 5;

/// The metric handles of one stage of one pipeline, taken once per worker
/// so that a call does not look its labels up.
#[derive(Debug, Clone)]
pub struct StageMetrics {
    pub messages_in: Counter,
    pub messages_out: Counter,
    pub duration: Histogram,
}

/// A message a stage dropped, as the sink task reports it.
pub struct DroppedMessage<'a> {
    pub stage: &'a str,
    pub reason: &'a str,
    pub topic: &'a str,
}

impl Events {
    /// Returns the events of a host with the device settings `devices`.
    pub fn new(devices: &crate::config::DevicesConfig) -> Self {
        Self {
            fleet: Fleet::new(devices.max_tracked),
            status_topic: devices.status_topic.clone(),
            ..Self::default()
        }
    }

    /// Returns the metric handles of `stage` in `pipeline`.
    pub fn stage_metrics(&self, pipeline: &str, stage: &str) -> StageMetrics {
        let labels = vec![
            ("pipeline", pipeline.to_owned()),
            ("stage", stage.to_owned()),
        ];
        StageMetrics {
            messages_in: self.stage_in.get_or_create_owned(&labels),
            messages_out: self.stage_out.get_or_create_owned(&labels),
            duration: self.stage_duration.get_or_create_owned(&labels),
        }
    }

    /// Returns whether a line of `key` may be logged now. When it may, also
    /// logs how many lines of that key were left out since the last one.
    pub fn admit(&self, key: &str) -> bool {
        let decision = self
            .limiter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .check(key, Instant::now());
        match decision {
            Decision::Log { suppressed } => {
                if suppressed > 0 {
                    tracing::warn!(
                        key,
                        suppressed,
                        window_secs = LOG_WINDOW.as_secs(),
                        "suppressed {suppressed} similar log lines in the last window"
                    );
                }
                true
            }
            Decision::Suppress => {
                self.suppressed.inc();
                false
            }
        }
    }

    /// Records that a message from the device of `topic` was routed to a
    /// pipeline.
    pub fn message_received(&self, device: &str, topic: &str) {
        if self.fleet.message(device, crate::clock::now_ms()) {
            tracing::debug!(device, topic, "device seen for the first time");
        }
    }

    /// Records a message that no pipeline's filter matches. The broker
    /// delivers such messages for a subscription that an older
    /// configuration made in a persistent session, or for a filter that
    /// the host matches differently than the broker. The message is
    /// acknowledged, so it is counted and logged, not lost in silence.
    pub fn message_unrouted(&self, topic: &str) {
        self.unrouted.inc();
        if self.admit("unrouted") {
            tracing::warn!(
                topic,
                "no pipeline's filter matches this message; acknowledged and ignored (a subscription kept \
                 from an older configuration ends when the session does, or with a new client_id)"
            );
        }
    }

    /// Records a message on the device status topic, and logs a change of
    /// the device's status.
    pub fn device_status(&self, topic: &str, payload: &[u8]) {
        let device = fleet::device_id(topic);
        let Some(status) = DeviceStatus::parse(payload) else {
            if self.admit(&format!("status-payload/{device}")) {
                tracing::warn!(
                    device,
                    topic,
                    bytes = payload.len(),
                    "status message ignored: the payload must be \"online\" or \"offline\""
                );
            }
            return;
        };
        let StatusChange::Changed { from, device: seen } =
            self.fleet.status(device, status, crate::clock::now_ms())
        else {
            return;
        };
        self.device_status
            .get_or_create(&vec![("status", status.as_str().to_owned())])
            .inc();
        let first_seen = crate::clock::rfc3339_ms(seen.first_seen_ms);
        let last_seen = crate::clock::rfc3339_ms(seen.last_seen_ms);
        let from = from.map_or("unknown", DeviceStatus::as_str);
        match status {
            DeviceStatus::Online => tracing::info!(
                device,
                from,
                first_seen,
                last_seen,
                messages = seen.messages,
                "device connected"
            ),
            DeviceStatus::Offline => tracing::info!(
                device,
                from,
                first_seen,
                last_seen,
                messages = seen.messages,
                "device disconnected"
            ),
        }
    }

    /// Logs that a plugin call trapped or ran out of time, after which its
    /// instance is replaced.
    pub fn plugin_failed(
        &self,
        pipeline: &str,
        plugin: &str,
        version: &str,
        topic: &str,
        error: &str,
    ) {
        if self.admit(&format!("plugin-failed/{pipeline}/{plugin}")) {
            tracing::warn!(
                pipeline,
                plugin,
                plugin_version = version,
                device = fleet::device_id(topic),
                topic,
                error,
                "plugin failed; its instance is replaced"
            );
        }
    }

    /// Counts a batch the sink task finished: `delivered` inputs reached
    /// every sink with `records` outputs, `dropped` were dropped by a stage,
    /// and `letters` were stored as dead letters. The sink task calls it
    /// after storing the letters, so a counted dead letter is in the store.
    pub fn batch_finished(
        &self,
        pipeline: &str,
        stats: &PipelineStats,
        delivered: u64,
        records: u64,
        dropped: &[DroppedMessage<'_>],
        letters: &[DeadLetter],
    ) {
        for message in dropped {
            tracing::debug!(
                pipeline,
                stage = message.stage,
                reason = message.reason,
                device = fleet::device_id(message.topic),
                topic = message.topic,
                "message dropped by a stage"
            );
            self.dropped
                .get_or_create(&vec![
                    ("pipeline", pipeline.to_owned()),
                    ("stage", message.stage.to_owned()),
                ])
                .inc();
        }
        self.dead_lettered(pipeline, letters);
        stats::add(&stats.delivered, delivered);
        stats::add(&stats.records_out, records);
        stats::add(&stats.dropped, dropped.len() as u64);
        stats::add(&stats.dead_lettered, letters.len() as u64);
    }

    /// Logs and counts stored dead letters, without the pipeline totals.
    fn dead_lettered(&self, pipeline: &str, letters: &[DeadLetter]) {
        for letter in letters {
            let kind = letter.kind.as_str();
            self.dead_lettered
                .get_or_create(&vec![
                    ("pipeline", pipeline.to_owned()),
                    ("stage", letter.stage.clone()),
                    ("kind", kind.to_owned()),
                ])
                .inc();
            if self.admit(&format!("dead-letter/{pipeline}/{}/{kind}", letter.stage)) {
                tracing::warn!(
                    pipeline,
                    stage = %letter.stage,
                    kind,
                    reason = %letter.reason,
                    device = fleet::device_of(&letter.message.topic, &letter.message.headers),
                    topic = %letter.message.topic,
                    "message dead-lettered"
                );
            }
        }
    }

    /// Counts the batch that the sink task stored as dead letters after it
    /// panicked.
    pub fn batch_dead_lettered(
        &self,
        pipeline: &str,
        stats: &PipelineStats,
        letters: &[DeadLetter],
    ) {
        self.dead_lettered(pipeline, letters);
        stats::add(&stats.dead_lettered, letters.len() as u64);
    }
}

/// The rate limiter's decision on one log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Write the line; `suppressed` lines of the same key were left out
    /// since the last one written.
    Log {
        suppressed: u64,
    },
    Suppress,
}

/// Lets at most `burst` lines per key through in each fixed window of
/// `window`, counted from the key's first line of that window. The first
/// line after a window with suppressed lines carries their number. Plain
/// state with explicit instants, so that it is unit-tested without a clock.
///
/// NOTE: the number of a key's suppressed lines is only written when that
/// key logs again; the counter `eliot_log_lines_suppressed_total` has them
/// at once.
#[derive(Debug)]
pub struct RateLimiter {
    window: Duration,
    burst: u32,
    keys: HashMap<String, KeyWindow>,
}

#[derive(Debug)]
struct KeyWindow {
    started: Instant,
    logged: u32,
    suppressed: u64,
}

/// Number of keys kept before expired ones are forgotten, which bounds the
/// memory that many distinct keys (one per device, say) can take.
const MAX_KEYS: usize = 10_000;

impl RateLimiter {
    pub fn new(window: Duration, burst: u32) -> Self {
        Self {
            window,
            burst,
            keys: HashMap::new(),
        }
    }

    pub fn check(&mut self, key: &str, now: Instant) -> Decision {
        if self.keys.len() >= MAX_KEYS && !self.keys.contains_key(key) {
            let window = self.window;
            self.keys
                .retain(|_, state| now.duration_since(state.started) < window);
        }
        let state = self
            .keys
            .entry(key.to_owned())
            .or_insert_with(|| KeyWindow {
                started: now,
                logged: 0,
                suppressed: 0,
            });
        if now.duration_since(state.started) >= self.window {
            state.started = now;
            state.logged = 0;
        }
        if state.logged < self.burst {
            state.logged += 1;
            Decision::Log {
                suppressed: std::mem::take(&mut state.suppressed),
            }
        } else {
            state.suppressed += 1;
            Decision::Suppress
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_lets_burst_through_per_key() {
        let mut limiter = RateLimiter::new(Duration::from_secs(10), 2);
        let start = Instant::now();
        assert_eq!(limiter.check("a", start), Decision::Log { suppressed: 0 });
        assert_eq!(limiter.check("a", start), Decision::Log { suppressed: 0 });
        assert_eq!(limiter.check("a", start), Decision::Suppress);
        assert_eq!(limiter.check("a", start), Decision::Suppress);
        assert_eq!(
            limiter.check("b", start),
            Decision::Log { suppressed: 0 },
            "another key has its own budget"
        );
    }

    #[test]
    fn limiter_reports_suppressed_in_next_window() {
        let mut limiter = RateLimiter::new(Duration::from_secs(10), 1);
        let start = Instant::now();
        assert_eq!(limiter.check("a", start), Decision::Log { suppressed: 0 });
        assert_eq!(
            limiter.check("a", start + Duration::from_secs(9)),
            Decision::Suppress
        );
        assert_eq!(
            limiter.check("a", start + Duration::from_secs(9)),
            Decision::Suppress
        );
        assert_eq!(
            limiter.check("a", start + Duration::from_secs(10)),
            Decision::Log { suppressed: 2 }
        );
        assert_eq!(
            limiter.check("a", start + Duration::from_secs(25)),
            Decision::Log { suppressed: 0 }
        );
    }

    #[test]
    fn limiter_forgets_old_keys_when_full() {
        let mut limiter = RateLimiter::new(Duration::from_secs(1), 1);
        let start = Instant::now();
        for index in 0..MAX_KEYS {
            limiter.check(&index.to_string(), start);
        }
        limiter.check("new", start + Duration::from_secs(2));
        assert_eq!(limiter.keys.len(), 1, "expired keys were dropped");
    }

    #[test]
    fn batch_counts_match_pipeline_totals() {
        let events = Events::default();
        let stats = PipelineStats::default();
        let drops = [DroppedMessage {
            stage: "filter",
            reason: "out of range",
            topic: "devices/a/telemetry",
        }];
        events.batch_finished("p", &stats, 3, 4, &drops, &[]);
        let snapshot = stats.snapshot();
        assert_eq!(snapshot.delivered, 3);
        assert_eq!(snapshot.records_out, 4);
        assert_eq!(snapshot.dropped, 1);
        let labels = vec![("pipeline", "p".to_owned()), ("stage", "filter".to_owned())];
        assert_eq!(events.dropped.get_or_create(&labels).get(), 1);
    }
}
