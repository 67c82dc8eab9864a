//! Starting and stopping the whole host: broker connection, plugins,
//! pipelines, sinks.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::{Config, SinkKind};
use crate::deadletter::DeadLetterStore;
use crate::pipeline::Pipeline;
use crate::sink::{FileSink, MqttSink, Sink, SinkTarget};
use crate::source::{self, SourceOptions};
use crate::stats::{PipelineStats, StatsSnapshot};
use crate::supervisor::Supervisor;
use crate::wasm::{LoadedPlugin, Runtime};

/// A running host. Dropping it without [`Host::shutdown`] leaves messages
/// unacknowledged, which the broker delivers again.
pub struct Host {
    /// Address of the broker the host is connected to.
    pub broker: SocketAddr,
    pub stats: BTreeMap<String, Arc<PipelineStats>>,
    pub plugins: BTreeMap<String, Arc<LoadedPlugin>>,
    pub supervisor: Arc<Supervisor>,
    /// Every pipeline's stages, for their breaker states.
    pub stages: BTreeMap<String, Arc<[crate::pipeline::Stage]>>,
    pub sinks: BTreeMap<String, Arc<Sink>>,
    shutdown: watch::Sender<bool>,
    connected: watch::Receiver<bool>,
    source: JoinHandle<()>,
    sink_tasks: Vec<JoinHandle<()>>,
    // Kept alive for the epoch ticker and the compiled components.
    _runtime: Arc<Runtime>,
}

impl Host {
    /// Loads every plugin, starts the embedded broker when the config asks
    /// for it, connects, and starts every pipeline.
    ///
    /// # Errors
    ///
    /// Fails when a plugin does not load, a sink cannot be opened, or the
    /// embedded broker does not start.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        // Resolve the broker first: the republish sinks connect to it too.
        let broker = if config.mqtt.broker == "embedded" {
            let listen: SocketAddr = config
                .embedded_broker
                .listen
                .parse()
                .context("embedded_broker.listen")?;
            let address = // The embedded broker takes payloads up to MQTT's maximum, so that
            // the host, not the broker, rejects oversized ones: the host
            // stores them as dead letters, the broker would only drop the
            // publisher's connection.
            crate::broker::start_embedded(listen, crate::config::MQTT_MAX_PAYLOAD)?;
            tracing::info!(address = %address, "embedded broker listening");
            address
        } else {
            let (host, port) =
                crate::broker::parse_address(&config.mqtt.broker).with_context(|| {
                    format!("mqtt.broker \"{}\" is not host:port", config.mqtt.broker)
                })?;
            let mut addresses = tokio::net::lookup_host((host.as_str(), port))
                .await
                .with_context(|| format!("cannot resolve broker host \"{host}\""))?;
            addresses
                .next()
                .with_context(|| format!("broker host \"{host}\" resolved to no address"))?
        };

        // Compile every plugin once. Compilation is CPU-bound, so it runs
        // off the async runtime.
        let runtime = Arc::new(Runtime::new(&config.cache_dir)?);
        let mut plugins = BTreeMap::new();
        for (name, plugin_config) in &config.plugins {
            let runtime = runtime.clone();
            let plugin_config = plugin_config.clone();
            let loaded =
                tokio::task::spawn_blocking(move || LoadedPlugin::load(&runtime, &plugin_config))
                    .await??;
            tracing::info!(
                plugin = %name,
                reports_name = %loaded.info.name,
                version = %loaded.info.version,
                file = %loaded.path.display(),
                "plugin loaded"
            );
            plugins.insert(name.clone(), Arc::new(loaded));
        }

        let dead_letters = Arc::new(DeadLetterStore::open(&config.dead_letter_path)?);
        let mut sinks: BTreeMap<String, Arc<Sink>> = BTreeMap::new();
        for (name, sink) in &config.sinks {
            let kind = match &sink.kind {
                SinkKind::File { path } => {
                    SinkTarget::File(std::sync::Mutex::new(FileSink::open(path)?))
                }
                SinkKind::Mqtt { topic, qos, retain } => SinkTarget::Mqtt(MqttSink::connect(
                    &broker.ip().to_string(),
                    broker.port(),
                    format!("{}-sink-{name}", config.mqtt.client_id),
                    topic.clone(),
                    *qos,
                    *retain,
                    config.mqtt.max_packet_bytes,
                )),
            };
            sinks.insert(
                name.clone(),
                Arc::new(Sink::new(name.clone(), kind, &sink.breaker)),
            );
        }

        // NOTE: a fixed restart intensity; it is not configurable yet.
        let supervisor = Arc::new(Supervisor::new(10, Duration::from_secs(60)));
        let mut pipelines = Vec::new();
        let mut sink_tasks = Vec::new();
        let mut stats = BTreeMap::new();
        let mut stage_map = BTreeMap::new();
        for pipeline in config.pipelines.values() {
            let stages = pipeline.stages.iter().map(|s| plugins[s].clone()).collect();
            let pipeline_sinks = pipeline.sinks.iter().map(|s| sinks[s].clone()).collect();
            let (running, task) = Pipeline::start(
                pipeline.clone(),
                stages,
                pipeline_sinks,
                dead_letters.clone(),
                supervisor.clone(),
            )
            .with_context(|| format!("pipeline \"{}\"", pipeline.name))?;
            stats.insert(pipeline.name.clone(), running.stats.clone());
            stage_map.insert(pipeline.name.clone(), running.stages.clone());
            pipelines.push(running);
            sink_tasks.push(task);
            tracing::info!(
                pipeline = %pipeline.name,
                topics = ?pipeline.topics.iter().map(|t| t.as_str()).collect::<Vec<_>>(),
                stages = ?pipeline.stages,
                sinks = ?pipeline.sinks,
                workers = pipeline.workers,
                "pipeline started"
            );
        }

        let options = SourceOptions {
            host: broker.ip().to_string(),
            port: broker.port(),
            client_id: config.mqtt.client_id.clone(),
            keep_alive: Duration::from_secs(config.mqtt.keep_alive_secs),
            max_packet_bytes: config.mqtt.max_packet_bytes,
        };
        let (client, eventloop) = source::connect(&options);
        let (ack_tx, ack_rx) = mpsc::unbounded_channel();
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (connected_tx, connected) = watch::channel(false);
        let ack_queue = crate::pipeline::AckQueue::new(ack_tx);
        let acker = tokio::spawn(source::run_acker(
            client.clone(),
            ack_queue.connection_counter(),
            ack_rx,
        ));
        // NOTE: the source is not restarted after a panic, because its
        // connection and pending messages die with it. The host stops
        // instead, and the broker redelivers what was not acknowledged.
        let source_supervisor = supervisor.clone();
        let source = tokio::spawn(async move {
            use futures::FutureExt as _;

            let run = source::run(
                client,
                eventloop,
                Arc::new(pipelines),
                ack_queue,
                shutdown_rx,
                connected_tx,
                acker,
                config.mqtt.max_packet_bytes,
            );
            if let Err(panic) = std::panic::AssertUnwindSafe(run).catch_unwind().await {
                source_supervisor.escalate("source", &crate::supervisor::panic_text(&panic));
            }
        });

        Ok(Self {
            broker,
            stats,
            plugins,
            supervisor,
            stages: stage_map,
            sinks,
            shutdown,
            connected,
            source,
            sink_tasks,
            _runtime: runtime,
        })
    }

    /// Waits until the source has connected and subscribed, or `timeout`.
    pub async fn wait_connected(&mut self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.connected.wait_for(|c| *c))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Breaker state of every stage (`pipeline/stage`) and sink
    /// (`sink:NAME`).
    pub fn breaker_states(&self) -> BTreeMap<String, crate::breaker::BreakerState> {
        let mut states = BTreeMap::new();
        for (pipeline, stages) in &self.stages {
            for stage in stages.iter() {
                states.insert(
                    format!("{pipeline}/{}", stage.plugin.name),
                    stage.breaker_state(),
                );
            }
        }
        for (name, sink) in &self.sinks {
            states.insert(format!("sink:{name}"), sink.breaker_state());
        }
        states
    }

    /// Counters of every pipeline.
    pub fn snapshot(&self) -> BTreeMap<String, StatsSnapshot> {
        self.stats
            .iter()
            .map(|(name, stats)| (name.clone(), stats.snapshot()))
            .collect()
    }

    /// Stops reading, lets the workers and sinks finish what they hold,
    /// and sends the acknowledgements of what was stored, within `deadline`.
    pub async fn shutdown(self, deadline: Duration) {
        tracing::info!("shutting down: no new messages are read");
        self.shutdown.send_replace(true);
        let drain = async {
            // The source drains: it releases the pipelines, waits for the
            // acker, and disconnects. The sink tasks have ended by then.
            let _ = self.source.await;
            for task in self.sink_tasks {
                let _ = task.await;
            }
        };
        if tokio::time::timeout(deadline, drain).await.is_err() {
            tracing::warn!(
                deadline_ms = deadline.as_millis() as u64,
                "shutdown deadline passed; unacknowledged messages will be redelivered"
            );
        }
    }
}
