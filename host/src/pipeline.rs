//! A running pipeline: worker threads that call the plugin chain, and the
//! sink task that writes results and releases acknowledgements.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backon::{BlockingRetryable, ExponentialBuilder};
use tokio::sync::mpsc;

use crate::ack::{AckTracker, Sequence};
use crate::config::PipelineConfig;
use crate::deadletter::{DeadLetter, DeadLetterFile, FailureKind};
use crate::sink::{Record, Sink};
use crate::stats::{self, PipelineStats};
use crate::wasm::{CallError, ErrorKind, LoadedPlugin, Message, Outcome, StageInstance};

/// Messages queued for one worker. Small, so that a slow pipeline makes the
/// source stop reading from the broker instead of buffering.
const WORKER_QUEUE: usize = 64;
/// Results queued for the sink task of one pipeline.
const RESULT_QUEUE: usize = 512;
/// Most results the sink task writes before it flushes and acknowledges.
const SINK_BATCH: usize = 256;
/// Retries of a stage that returns a transient error, before dead-lettering.
const TRANSIENT_RETRIES: usize = 3;

/// The ack tracker shared by the source (which registers each message on
/// arrival) and the sink tasks (which finish them). The lock is held only for
/// a registration or a finish, and the released acks are queued on the
/// unbounded channel while it is held, so they reach the acker in order.
pub struct AckQueue {
    tracker: std::sync::Mutex<AckTracker<rumqttc::Publish>>,
    acks: mpsc::UnboundedSender<rumqttc::Publish>,
}

impl AckQueue {
    pub fn new(acks: mpsc::UnboundedSender<rumqttc::Publish>) -> Arc<Self> {
        Arc::new(Self { tracker: std::sync::Mutex::new(AckTracker::default()), acks })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AckTracker<rumqttc::Publish>> {
        self.tracker.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Releases the broker acknowledgement of one received message once every
/// pipeline it was routed to has finished with it.
pub struct AckHandle {
    remaining: AtomicUsize,
    /// `None` for QoS 0, which has nothing to acknowledge.
    sequence: Option<Sequence>,
    queue: Arc<AckQueue>,
}

impl AckHandle {
    /// Registers `publish` in arrival order. `pipelines` is the number of
    /// pipelines the message was routed to.
    pub fn new(publish: rumqttc::Publish, pipelines: usize, queue: &Arc<AckQueue>) -> Arc<Self> {
        let sequence = (publish.qos != rumqttc::QoS::AtMostOnce).then(|| queue.lock().register(publish));
        Arc::new(Self { remaining: AtomicUsize::new(pipelines), sequence, queue: queue.clone() })
    }

    /// Marks one pipeline as finished; the last one releases the ack, which
    /// goes out once every earlier message was acknowledged too.
    pub fn finish(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let Some(sequence) = self.sequence else { return };
        let mut tracker = self.queue.lock();
        for publish in tracker.finish(sequence) {
            // The acker only stops after the source, so a send error means
            // the host is shutting down and the broker will redeliver.
            let _ = self.queue.acks.send(publish);
        }
    }
}

/// One message on its way through a pipeline.
pub struct Job {
    pub message: Message,
    pub ack: Arc<AckHandle>,
}

/// What the chain of stages made of one input message.
enum ChainResult {
    /// Every message that came out of the last stage.
    Outputs(Vec<Message>),
    /// A stage consumed the message on purpose.
    Dropped { stage: String, reason: String },
    /// A stage failed; the original message goes to the dead letters.
    Failed { stage: String, kind: FailureKind, reason: String },
}

struct Processed {
    job: Job,
    result: ChainResult,
    processed_by: Arc<[String]>,
}

/// The handle the source uses to feed a pipeline.
pub struct Pipeline {
    pub config: PipelineConfig,
    pub stats: Arc<PipelineStats>,
    workers: Vec<mpsc::Sender<Job>>,
}

impl Pipeline {
    /// Starts `config.workers` worker threads, each with its own instance of
    /// every stage, and the sink task.
    ///
    /// # Errors
    ///
    /// Fails when a worker cannot instantiate a stage.
    pub fn start(
        config: PipelineConfig,
        plugins: Vec<Arc<LoadedPlugin>>,
        sinks: Vec<(String, Arc<Sink>)>,
        dead_letters: Arc<DeadLetterFile>,
    ) -> anyhow::Result<(Self, tokio::task::JoinHandle<()>)> {
        let stats = Arc::new(PipelineStats::default());
        let (result_tx, result_rx) = mpsc::channel(RESULT_QUEUE);
        let processed_by: Arc<[String]> =
            plugins.iter().map(|p| format!("{}@{}", p.name, p.info.version)).collect::<Vec<_>>().into();

        let mut workers = Vec::with_capacity(config.workers);
        for index in 0..config.workers {
            let mut instances = Vec::with_capacity(plugins.len());
            for plugin in &plugins {
                instances.push(Some(plugin.instantiate()?));
            }
            let (tx, rx) = mpsc::channel(WORKER_QUEUE);
            let worker = Worker {
                pipeline: config.name.clone(),
                plugins: plugins.clone(),
                instances,
                processed_by: processed_by.clone(),
            };
            let results = result_tx.clone();
            std::thread::Builder::new()
                .name(format!("eliot-{}-{index}", config.name))
                .spawn(move || worker.run(rx, results))?;
            workers.push(tx);
        }
        drop(result_tx);

        let sink_task = tokio::spawn(sink_loop(config.name.clone(), result_rx, sinks, dead_letters, stats.clone()));
        Ok((Self { config, stats, workers }, sink_task))
    }

    /// Queues `job` on the worker that owns its device, waiting while that
    /// worker's queue is full. Messages with the same key always go to the
    /// same worker, which keeps them in order.
    pub async fn dispatch(&self, key: &str, job: Job) {
        stats::add(&self.stats.received, 1);
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut hasher);
        let index = (hasher.finish() % self.workers.len() as u64) as usize;
        if let Err(mpsc::error::SendError(job)) = self.workers[index].send(job).await {
            // The worker thread ended, which only happens when it panicked.
            // Leaving the message unacknowledged lets the broker redeliver it.
            tracing::error!(pipeline = %self.config.name, worker = index, topic = %job.message.topic, "worker is gone; message left unacknowledged");
        }
    }
}

/// The stages of one worker: each stage's plugin and its live instance.
struct Worker {
    pipeline: String,
    plugins: Vec<Arc<LoadedPlugin>>,
    /// `None` after a trap, until the next message creates a fresh one.
    instances: Vec<Option<StageInstance>>,
    processed_by: Arc<[String]>,
}

impl Worker {
    /// Plugin calls are synchronous and run on this dedicated thread, so a
    /// slow plugin never blocks the tokio runtime.
    fn run(mut self, mut jobs: mpsc::Receiver<Job>, results: mpsc::Sender<Processed>) {
        while let Some(job) = jobs.blocking_recv() {
            let result = self.run_chain(job.message.clone());
            let processed = Processed { job, result, processed_by: self.processed_by.clone() };
            if results.blocking_send(processed).is_err() {
                break;
            }
        }
    }

    fn run_chain(&mut self, message: Message) -> ChainResult {
        let mut current = vec![message];
        for index in 0..self.plugins.len() {
            let mut next = Vec::with_capacity(current.len());
            let mut drop_reason = None;
            for message in &current {
                match self.call_stage(index, message) {
                    Ok(Outcome::Forward(out)) => next.push(out),
                    Ok(Outcome::FanOut(outs)) => next.extend(outs),
                    Ok(Outcome::Drop(reason)) => drop_reason = Some(reason),
                    Err((kind, reason)) => {
                        return ChainResult::Failed { stage: self.plugins[index].name.clone(), kind, reason }
                    }
                }
            }
            if next.is_empty() {
                let reason = drop_reason.unwrap_or_else(|| "the stage fanned out to no messages".to_owned());
                return ChainResult::Dropped { stage: self.plugins[index].name.clone(), reason };
            }
            current = next;
        }
        ChainResult::Outputs(current)
    }

    /// Calls one stage, retrying transient errors with exponential backoff
    /// and jitter. A trap or timeout discards the instance.
    fn call_stage(&mut self, index: usize, message: &Message) -> Result<Outcome, (FailureKind, String)> {
        let plugin = self.plugins[index].clone();
        let pipeline = self.pipeline.clone();
        let slot = &mut self.instances[index];
        let attempt = || -> Result<Outcome, (FailureKind, String)> {
            if slot.is_none() {
                let instance = plugin.instantiate().map_err(|e| (FailureKind::Trap, e.to_string()))?;
                *slot = Some(instance);
            }
            let instance = slot.as_mut().expect("instance was just created");
            match instance.process(message) {
                Ok(Ok(outcome)) => Ok(outcome),
                Ok(Err(error)) => {
                    let kind = match error.kind {
                        ErrorKind::Invalid => FailureKind::Invalid,
                        ErrorKind::Transient => FailureKind::Transient,
                    };
                    Err((kind, error.message))
                }
                Err(call_error) => {
                    *slot = None;
                    let kind = match call_error {
                        CallError::Timeout { .. } => FailureKind::Timeout,
                        CallError::Trap(_) => FailureKind::Trap,
                    };
                    tracing::warn!(pipeline, plugin = %plugin.name, topic = %message.topic, error = %call_error, "plugin failed; its instance is replaced");
                    Err((kind, call_error.to_string()))
                }
            }
        };
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(10))
            .with_max_delay(Duration::from_millis(500))
            .with_max_times(TRANSIENT_RETRIES)
            .with_jitter();
        attempt
            .retry(backoff)
            .sleep(std::thread::sleep)
            .when(|(kind, _)| *kind == FailureKind::Transient)
            .call()
    }
}

/// Writes results to the sinks in batches, stores dead letters, and only
/// then releases the acknowledgements of the batch.
async fn sink_loop(
    pipeline: String,
    mut results: mpsc::Receiver<Processed>,
    sinks: Vec<(String, Arc<Sink>)>,
    dead_letters: Arc<DeadLetterFile>,
    stats: Arc<PipelineStats>,
) {
    let mut batch = Vec::with_capacity(SINK_BATCH);
    while results.recv_many(&mut batch, SINK_BATCH).await > 0 {
        let mut letters = Vec::new();
        let mut delivered = 0;
        let mut dropped = 0;
        let mut records = 0;
        for processed in &batch {
            match &processed.result {
                ChainResult::Outputs(outputs) => {
                    match write_outputs(&pipeline, &sinks, outputs, &processed.processed_by).await {
                        Ok(()) => {
                            delivered += 1;
                            records += outputs.len() as u64;
                        }
                        Err((stage, reason)) => letters.push(DeadLetter {
                            pipeline: pipeline.clone(),
                            stage,
                            kind: FailureKind::Sink,
                            reason,
                            message: processed.job.message.clone(),
                        }),
                    }
                }
                ChainResult::Dropped { stage, reason } => {
                    tracing::debug!(pipeline, stage, reason, topic = %processed.job.message.topic, "message dropped by a stage");
                    dropped += 1;
                }
                ChainResult::Failed { stage, kind, reason } => {
                    tracing::warn!(pipeline, stage, kind = kind.as_str(), reason, topic = %processed.job.message.topic, "message dead-lettered");
                    letters.push(DeadLetter {
                        pipeline: pipeline.clone(),
                        stage: stage.clone(),
                        kind: *kind,
                        reason: reason.clone(),
                        message: processed.job.message.clone(),
                    });
                }
            }
        }

        flush_sinks(&sinks).await;
        if !letters.is_empty() {
            let letters: Vec<&DeadLetter> = letters.iter().collect();
            retry_until_ok("dead-letter file", || dead_letters.append(&letters)).await;
        }

        stats::add(&stats.delivered, delivered);
        stats::add(&stats.records_out, records);
        stats::add(&stats.dropped, dropped);
        stats::add(&stats.dead_lettered, letters.len() as u64);
        for processed in batch.drain(..) {
            processed.job.ack.finish();
        }
    }
}

/// Writes every output of one input to every sink. A topic that cannot be
/// built fails the whole input before anything is written, so that an input
/// is either delivered in full or dead-lettered.
async fn write_outputs(
    pipeline: &str,
    sinks: &[(String, Arc<Sink>)],
    outputs: &[Message],
    processed_by: &[String],
) -> Result<(), (String, String)> {
    let mut topics = Vec::new();
    for (name, sink) in sinks {
        if let Sink::Mqtt(mqtt) = &**sink {
            for message in outputs {
                let topic = mqtt.topic.render(pipeline, message).map_err(|reason| (format!("sink:{name}"), reason))?;
                topics.push(topic);
            }
        }
    }

    let mut topics = topics.into_iter();
    for (name, sink) in sinks {
        match &**sink {
            Sink::File(file) => {
                let lines: Vec<serde_json::Value> = outputs
                    .iter()
                    .map(|message| crate::sink::record_json(&Record { pipeline, message, processed_by }))
                    .collect();
                retry_until_ok(name, || {
                    let mut file = file.lock().unwrap_or_else(|e| e.into_inner());
                    lines.iter().try_for_each(|line| file.write_json(line))
                })
                .await;
            }
            Sink::Mqtt(mqtt) => {
                for message in outputs {
                    let topic = topics.next().expect("one topic was rendered per output");
                    if let Err(e) = mqtt.publish(topic, message.payload.clone()).await {
                        // Only fails once the client is closed, at shutdown.
                        tracing::error!(pipeline, sink = %name, error = %e, "republish failed");
                    }
                }
            }
        }
    }
    Ok(())
}

async fn flush_sinks(sinks: &[(String, Arc<Sink>)]) {
    for (name, sink) in sinks {
        if let Sink::File(file) = &**sink {
            retry_until_ok(name, || file.lock().unwrap_or_else(|e| e.into_inner()).flush()).await;
        }
    }
}

/// Retries a sink write with capped exponential backoff until it succeeds.
/// Nothing is acknowledged meanwhile, so the broker holds the messages.
async fn retry_until_ok<E: std::fmt::Display>(what: &str, mut write: impl FnMut() -> Result<(), E>) {
    let mut backoff = crate::source::ReconnectBackoff::new();
    loop {
        match write() {
            Ok(()) => return,
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::error!(sink = what, error = %e, retry_in_ms = delay.as_millis() as u64, "sink write failed; retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}
