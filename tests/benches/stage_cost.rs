//! The cost of one pipeline stage: a call of `process` on a pass-through
//! Rust plugin (tests/plugins/versioned) in wasmtime, as a worker makes it,
//! at payloads of 200 B, 1 KB and 64 KB. The call copies the message into
//! the instance and the result back out, so the payload size shows the cost
//! of those copies. The three example stages, which parse the JSON payload
//! (and `enrich` writes it again), are measured at 200 B beside it.
//!
//! Run with `cargo bench -p eliot-tests --bench stage_cost`.

use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use eliot::config::{Grants, PluginConfig, PluginLimits, StageBreakerConfig};
use eliot::wasm::{LoadedPlugin, Message, Outcome, Qos, Runtime, StageInstance};
use eliot_tests::plugins::{build_examples, build_versioned};

/// Builds a reading in the device message format, padded with a `note`
/// field to `size` bytes.
fn payload(size: usize) -> Vec<u8> {
    let head = r#"{"device_id": "robot_001", "timestamp": "2025-06-05T14:30:00Z", "sensor_type": "gps", "data": {"latitude": 37.7749, "longitude": -122.4194, "accuracy": 3.2}, "note": ""#;
    let tail = "\"}";
    let padding = size.saturating_sub(head.len() + tail.len());
    let mut bytes = Vec::with_capacity(size);
    bytes.extend_from_slice(head.as_bytes());
    bytes.resize(head.len() + padding, b'x');
    bytes.extend_from_slice(tail.as_bytes());
    bytes
}

fn message(size: usize) -> Message {
    Message {
        topic: "devices/robot_001/telemetry".to_owned(),
        payload: payload(size),
        qos: Qos::AtLeastOnce,
        retain: false,
        received_at_ms: 1_749_133_800_000,
        headers: Vec::new(),
    }
}

fn instance(runtime: &Runtime, name: &str, path: &Path, config: serde_json::Value) -> StageInstance {
    let config = PluginConfig {
        name: name.to_owned(),
        path: path.to_owned(),
        config,
        limits: PluginLimits::default(),
        breaker: StageBreakerConfig::default(),
        grants: Grants::default(),
        max_retries: 0,
    };
    let plugin = LoadedPlugin::load(runtime, &config).unwrap_or_else(|e| panic!("cannot load {}: {e}", path.display()));
    plugin.instantiate().unwrap_or_else(|e| panic!("cannot instantiate {name}: {e}"))
}

/// Calls `process` once and checks that the stage forwarded the message.
fn call(stage: &mut StageInstance, message: &Message) {
    match stage.process(message) {
        Ok(Ok(Outcome::Forward(out))) => {
            std::hint::black_box(out);
        }
        other => panic!("the stage did not forward the message: {other:?}"),
    }
}

fn stage_cost(c: &mut Criterion) {
    let cache = tempfile::tempdir().expect("a temporary folder");
    let runtime = Runtime::new(cache.path()).expect("the wasmtime runtime");
    let mut pass_through = instance(&runtime, "versioned", &build_versioned("1.0.0", false), serde_json::json!({}));

    let mut group = c.benchmark_group("pass-through stage");
    for size in [200, 1024, 64 * 1024] {
        let message = message(size);
        assert_eq!(message.payload.len(), size);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &message, |b, message| {
            b.iter(|| call(&mut pass_through, message));
        });
    }
    group.finish();

    // The three example stages at 200 B, each on the reading as it
    // arrives; together they are the chain of the throughput benchmark.
    let examples = build_examples();
    let message = message(200);
    for (name, file) in [("enrich", "enrich.wasm"), ("validate-format", "validate_format.wasm"), ("sanity-filter", "sanity_filter.wasm")] {
        let mut stage = instance(&runtime, name, &examples.join(file), serde_json::json!({}));
        c.bench_function(&format!("{name} stage/200"), |b| b.iter(|| call(&mut stage, &message)));
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = stage_cost
}
criterion_main!(benches);
