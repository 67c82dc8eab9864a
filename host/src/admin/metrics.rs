//! `/metrics`: the host's counters in the OpenMetrics text format, which
//! Prometheus scrapes.
//!
//! Counters that the host already keeps (the pipeline totals of
//! [`PipelineStats`](crate::stats::PipelineStats), the reload outcomes, the
//! task restarts) are read at scrape time by [`HostCollector`] rather than
//! copied, so each is counted once. The per-stage families and the stage
//! latency histograms live in [`Events`](crate::events::Events).

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use super::AdminState;
use crate::breaker::BreakerState;
use crate::deadletter::ListFilter;
use crate::fleet::DeviceStatus;

/// Builds the registry that `/metrics` encodes.
pub fn registry(state: Arc<AdminState>) -> Registry {
    let mut registry = Registry::default();
    let events = &state.events;
    registry.register(
        "eliot_messages_dropped",
        "Input messages a stage dropped on purpose",
        events.dropped.clone(),
    );
    registry.register(
        "eliot_messages_dead_lettered",
        "Input messages stored as dead letters, by the stage that failed and the kind of failure",
        events.dead_lettered.clone(),
    );

    registry.register(
        "eliot_stage_messages_in",
        "Messages handed to a stage",
        events.stage_in.clone(),
    );
    registry.register(
        "eliot_stage_messages_out",
        "Messages a stage passed on; a fan-out counts each output, a skipped stage passes its input",
        events.stage_out.clone(),
    );
    registry.register_with_unit(
        "eliot_stage_duration",
        "Time a message spent in a stage, retries included",
        Unit::Seconds,
        events.stage_duration.clone(),
    );

    registry.register(
        "eliot_device_status_changes",
        "Device status changes read from the status topic, by new status",
        events.device_status.clone(),
    );
    registry.register(
        "eliot_log_lines_suppressed",
        "Log lines left out by the rate limiter",
        events.suppressed.clone(),
    );
    registry.register(
        "eliot_devices_evicted",
        "Devices the registry forgot to stay within devices.max_tracked",
        events.fleet.evicted.clone(),
    );
    registry.register(
        "eliot_messages_unrouted",
        "Messages the broker delivered that no pipeline's filter matches; acknowledged and ignored",
        events.unrouted.clone(),
    );

    registry.register_collector(Box::new(HostCollector { state }));
    registry
}

/// Reads the host's own counters and states at scrape time.
#[derive(Debug)]
struct HostCollector {
    state: Arc<AdminState>,
}

impl Collector for HostCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let state = &self.state;
        let pipelines = state.pipelines.current();
        let snapshots: Vec<(String, crate::stats::StatsSnapshot)> = pipelines
            .iter()
            .map(|p| (p.config.name.clone(), p.stats.snapshot()))
            .collect();

        type Read = fn(&crate::stats::StatsSnapshot) -> u64;
        let totals: [(&str, &str, Read); 4] = [
            (
                "eliot_messages_received",
                "Messages routed to a pipeline, redeliveries included",
                |s| s.received,
            ),
            (
                "eliot_messages_delivered",
                "Input messages whose every output reached every sink",
                |s| s.delivered,
            ),
            (
                "eliot_records_out",
                "Output records written to the sinks",
                |s| s.records_out,
            ),
            (
                "eliot_breaker_opened",
                "Times a stage circuit breaker opened",
                |s| s.breaker_opened,
            ),
        ];
        for (name, help, read) in totals {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (pipeline, snapshot) in &snapshots {
                let labels = [("pipeline", pipeline.as_str())];
                ConstCounter::new(read(snapshot)).encode(metric.encode_family(&labels)?)?;
            }
        }

        // One series per breaker and state, 1 for the state it is in, as
        // Prometheus's own exporters report enumerations.
        let mut metric = encoder.encode_descriptor(
            "eliot_breaker_state",
            "Circuit breaker state: 1 for the current state of each stage and sink breaker",
            None,
            MetricType::Gauge,
        )?;
        let mut breakers: Vec<(&str, String, String, BreakerState)> = Vec::new();
        for pipeline in pipelines.iter() {
            for stage in pipeline.stages.current().1.iter() {
                breakers.push((
                    "stage",
                    pipeline.config.name.clone(),
                    stage.name.clone(),
                    stage.breaker_state(),
                ));
            }
        }
        for (name, sink) in &state.sinks {
            breakers.push(("sink", String::new(), name.clone(), sink.breaker_state()));
        }
        for (kind, pipeline, name, current) in &breakers {
            for candidate in [
                BreakerState::Closed,
                BreakerState::HalfOpen,
                BreakerState::Open,
            ] {
                let labels = [
                    ("kind", *kind),
                    ("pipeline", pipeline.as_str()),
                    ("name", name.as_str()),
                    ("state", candidate.as_str()),
                ];
                ConstGauge::new(i64::from(candidate == *current))
                    .encode(metric.encode_family(&labels)?)?;
            }
        }

        let reloads = &state.reloader.stats;
        let mut metric = encoder.encode_descriptor(
            "eliot_reloads",
            "Plugin and config reloads, by outcome",
            None,
            MetricType::Counter,
        )?;
        for (outcome, counter) in [
            ("applied", &reloads.applied),
            ("rolled-back", &reloads.rolled_back),
            ("unchanged", &reloads.unchanged),
        ] {
            let value = counter.load(std::sync::atomic::Ordering::Relaxed);
            ConstCounter::new(value).encode(metric.encode_family(&[("outcome", outcome)])?)?;
        }

        let metric = encoder.encode_descriptor(
            "eliot_task_restarts",
            "Restarts of supervised tasks after a panic",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(state.supervisor.restarts()).encode(metric)?;

        let metric = encoder.encode_descriptor(
            "eliot_broker_connected",
            "1 while the source is connected to the broker and subscribed",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::from(*state.connected.borrow())).encode(metric)?;

        // NOTE: a count over the whole store on every scrape; cheap for the
        // thousands of letters a store normally holds, slower for millions.
        match state.dead_letters.count(&ListFilter::default()) {
            Ok(stored) => {
                let metric = encoder.encode_descriptor(
                    "eliot_dead_letters_stored",
                    "Dead letters in the store now",
                    None,
                    MetricType::Gauge,
                )?;
                ConstGauge::new(i64::try_from(stored).unwrap_or(i64::MAX)).encode(metric)?;
            }
            Err(e) => tracing::warn!(error = %e, "cannot count the dead letters for /metrics"),
        }

        let devices = state.events.fleet.snapshot();
        let mut by_status = [("online", 0i64), ("offline", 0), ("unknown", 0)];
        for device in devices.values() {
            let slot = match device.status {
                Some(DeviceStatus::Online) => 0,
                Some(DeviceStatus::Offline) => 1,
                None => 2,
            };
            by_status[slot].1 += 1;
        }
        let mut metric = encoder.encode_descriptor(
            "eliot_devices",
            "Devices seen since the host started, by last known status",
            None,
            MetricType::Gauge,
        )?;
        for (status, count) in by_status {
            ConstGauge::new(count).encode(metric.encode_family(&[("status", status)])?)?;
        }
        Ok(())
    }
}
