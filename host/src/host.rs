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
use crate::pipeline::{PipelineLauncher, PipelineSet, PluginSlot};
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
    pub supervisor: Arc<Supervisor>,
    /// Applies changed plugin files and config; see
    /// [`Reloader::watch`](crate::reload::Reloader::watch).
    pub reloader: Arc<crate::reload::Reloader>,
    pub pipelines: Arc<PipelineSet>,
    launcher: Arc<PipelineLauncher>,
    pub sinks: BTreeMap<String, Arc<Sink>>,
    /// Device registry, per-stage counters and the log rate limiter.
    pub events: Arc<crate::events::Events>,
    /// Bound address of the admin HTTP server, when `[admin]` is set.
    pub admin_address: Option<SocketAddr>,
    admin_task: Option<JoinHandle<()>>,
    shutdown: watch::Sender<bool>,
    connected: watch::Receiver<bool>,
    source: JoinHandle<()>,
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
        let config_for_reload = config.clone();
        // Resolve the broker first: the republish sinks connect to it too.
        // An external broker is dialled by the name in the config, not by
        // the address it resolves to now, so that TLS checks the
        // certificate against that name and a changed DNS entry is followed
        // on reconnect.
        let mut dial = None;
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
            let (host, port) = config.mqtt.address().with_context(|| {
                format!("mqtt.broker \"{}\" is not host:port", config.mqtt.broker)
            })?;
            let address = tokio::net::lookup_host((host.as_str(), port))
                .await
                .with_context(|| format!("cannot resolve broker host \"{host}\""))?
                .next()
                .with_context(|| format!("broker host \"{host}\" resolved to no address"))?;
            dial = Some((host, port));
            address
        };
        let endpoint = match dial {
            Some((host, port)) => crate::mqtt::Endpoint::new(&config.mqtt, host, port)
                .map_err(|e| anyhow::anyhow!("mqtt.tls.{}: {e}; {}", e.key(), e.fix()))?,
            None => crate::mqtt::Endpoint::plain(
                broker.ip().to_string(),
                broker.port(),
                Duration::from_secs(config.mqtt.keep_alive_secs),
            ),
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
            plugins.insert(name.clone(), Arc::new(PluginSlot::new(Arc::new(loaded))));
        }

        let dead_letters = Arc::new(DeadLetterStore::open(&config.dead_letter_path).with_context(|| {
            "dead_letters.path: the store cannot be opened; name a file in a folder the host may write"
        })?);
        let mut sinks: BTreeMap<String, Arc<Sink>> = BTreeMap::new();
        for (name, sink) in &config.sinks {
            let kind = match &sink.kind {
                SinkKind::File { path } => {
                    SinkTarget::File(std::sync::Mutex::new(FileSink::open(path).with_context(|| {
                        format!("sinks.{name}.path: the file cannot be opened for appending; name a file in a folder the host may write")
                    })?))
                }
                SinkKind::Mqtt { topic, qos, retain } => SinkTarget::Mqtt(MqttSink::connect(
                    endpoint.clone(),
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
        let events = Arc::new(crate::events::Events::new(&config.devices));
        let launcher = Arc::new(PipelineLauncher {
            sinks: sinks.clone(),
            dead_letters: dead_letters.clone(),
            supervisor: supervisor.clone(),
            sink_tasks: std::sync::Mutex::new(Vec::new()),
            events: events.clone(),
        });
        let mut pipelines = Vec::new();
        for pipeline in config.pipelines.values() {
            pipelines.push(
                launcher
                    .start_off_runtime(pipeline, &plugins)
                    .await
                    .with_context(|| format!("pipeline \"{}\"", pipeline.name))?,
            );
        }
        let pipelines = PipelineSet::new(pipelines);

        let reloader = Arc::new(crate::reload::Reloader::new(
            runtime.clone(),
            config_for_reload,
            plugins,
            pipelines.clone(),
            launcher.clone(),
        ));

        let (shutdown, shutdown_rx) = watch::channel(false);
        let (connected_tx, connected) = watch::channel(false);
        // The admin server binds before the source starts, so that a port in
        // use fails the start before any message is read.
        let (admin_address, admin_task) = match &config.admin {
            None => (None, None),
            Some(admin) => {
                let state = Arc::new(crate::admin::AdminState {
                    pipelines: pipelines.clone(),
                    sinks: sinks.clone(),
                    reloader: reloader.clone(),
                    supervisor: supervisor.clone(),
                    connected: connected.clone(),
                    dead_letters: dead_letters.clone(),
                    events: events.clone(),
                    broker,
                    token: crate::admin::auth::read_token(&admin.token_env),
                    token_env: admin.token_env.clone(),
                    mutation: tokio::sync::Mutex::new(()),
                });
                let (address, task) =
                    crate::admin::serve(admin.listen, state, shutdown.subscribe()).await?;
                tracing::info!(address = %address, "admin server listening");
                (Some(address), Some(task))
            }
        };

        let options = SourceOptions {
            endpoint,
            client_id: config.mqtt.client_id.clone(),
            max_packet_bytes: config.mqtt.max_packet_bytes,
        };
        let (ack_tx, ack_rx) = mpsc::unbounded_channel();
        let ack_queue = crate::pipeline::AckQueue::new(ack_tx);
        let (client, eventloop) = source::connect(&options);
        let (client_tx, client_rx) = watch::channel(client.clone());
        let acker = tokio::spawn(supervise_acker(
            client_rx,
            ack_queue.connection_counter(),
            ack_rx,
            supervisor.clone(),
        ));
        let source = tokio::spawn(supervise_source(
            options,
            (client, eventloop),
            client_tx,
            SourceShared {
                pipelines: pipelines.clone(),
                ack_queue,
                shutdown: shutdown_rx,
                connected: connected_tx,
                max_payload_bytes: config.mqtt.max_packet_bytes,
                events: events.clone(),
            },
            acker,
            supervisor.clone(),
        ));

        Ok(Self {
            broker,
            supervisor,
            reloader,
            pipelines,
            launcher,
            sinks,
            events,
            admin_address,
            admin_task,
            shutdown,
            connected,
            source,
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
        for pipeline in self.pipelines.current().iter() {
            for stage in pipeline.stages.current().1.iter() {
                states.insert(
                    format!("{}/{}", pipeline.config.name, stage.name),
                    stage.breaker_state(),
                );
            }
        }
        for (name, sink) in &self.sinks {
            states.insert(format!("sink:{name}"), sink.breaker_state());
        }
        states
    }

    /// Counters of every running pipeline.
    pub fn stats(&self) -> BTreeMap<String, Arc<PipelineStats>> {
        self.pipelines
            .current()
            .iter()
            .map(|pipeline| (pipeline.config.name.clone(), pipeline.stats.clone()))
            .collect()
    }

    /// Counters of every running pipeline, read now.
    pub fn snapshot(&self) -> BTreeMap<String, StatsSnapshot> {
        self.stats()
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
            for task in self.launcher.take_sink_tasks() {
                let _ = task.await;
            }
            // The admin server stopped taking requests when the shutdown
            // began; this waits for the ones in progress.
            if let Some(task) = self.admin_task {
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

/// State the source task shares with the rest of the host and keeps over
/// a restart.
struct SourceShared {
    pipelines: Arc<PipelineSet>,
    ack_queue: Arc<crate::pipeline::AckQueue>,
    shutdown: watch::Receiver<bool>,
    connected: watch::Sender<bool>,
    max_payload_bytes: usize,
    events: Arc<crate::events::Events>,
}

/// Runs the source task and restarts it after a panic with a new broker
/// connection. The messages the failed task held are not acknowledged, and
/// the persistent session makes the broker deliver them again; messages
/// that were already in a pipeline may so arrive twice, which
/// at-least-once allows. Once shutdown is asked for, drains.
async fn supervise_source(
    options: SourceOptions,
    mut connection: (crate::mqtt::Client, crate::mqtt::EventLoop),
    client: watch::Sender<crate::mqtt::Client>,
    shared: SourceShared,
    acker: JoinHandle<()>,
    supervisor: Arc<Supervisor>,
) {
    use futures::FutureExt as _;

    loop {
        let run = source::run(
            connection.0,
            connection.1,
            &shared.pipelines,
            &shared.ack_queue,
            shared.shutdown.clone(),
            &shared.connected,
            shared.max_payload_bytes,
            &shared.events,
        );
        match std::panic::AssertUnwindSafe(run).catch_unwind().await {
            Ok((finished, stopped)) => {
                if let source::Stopped::Rejected(reason) = stopped {
                    supervisor.escalate("source", &reason);
                }
                source::drain(
                    finished,
                    &shared.pipelines,
                    shared.ack_queue,
                    acker,
                    &shared.connected,
                )
                .await;
                return;
            }
            Err(panic) => {
                shared.connected.send_replace(false);
                let reason = crate::supervisor::panic_text(&panic);
                if !supervisor.restarted("source", &reason) {
                    return;
                }
                let abandoned = shared.ack_queue.abandon_connection();
                tracing::info!(
                    abandoned,
                    "source restarting with a new connection; the broker delivers its unacknowledged messages again"
                );
                connection = source::connect(&options);
                client.send_replace(connection.0.clone());
            }
        }
    }
}

/// Runs the acker and restarts it after a panic. The ack it was sending is
/// lost, so the broker delivers that message again after the next
/// reconnect; the ones behind it still go out.
async fn supervise_acker(
    client: watch::Receiver<crate::mqtt::Client>,
    connection: Arc<std::sync::atomic::AtomicU64>,
    mut acks: mpsc::UnboundedReceiver<(crate::mqtt::AckToken, u64)>,
    supervisor: Arc<Supervisor>,
) {
    use futures::FutureExt as _;

    loop {
        let run = source::run_acker(client.clone(), connection.clone(), &mut acks);
        match std::panic::AssertUnwindSafe(run).catch_unwind().await {
            Ok(()) => return,
            Err(panic) => {
                if !supervisor.restarted("acker", &crate::supervisor::panic_text(&panic)) {
                    return;
                }
            }
        }
    }
}
