//! A running pipeline: worker threads that call the plugin chain, and the
//! sink task that writes results and releases acknowledgements.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backon::{BlockingRetryable, ExponentialBuilder};
use tokio::sync::mpsc;

use crate::ack::{AckTracker, Sequence};
use crate::breaker::{BreakerState, CircuitBreaker, Permit, Transition};
use crate::config::{OpenPolicy, PipelineConfig};
use crate::deadletter::{DeadLetter, DeadLetterStore, FailureKind};
use crate::events::{DroppedMessage, Events, StageMetrics};
use crate::sink::{Record, Sink, SinkTarget};
use crate::stats::{self, PipelineStats};
use crate::wasm::{CallError, ErrorKind, LoadedPlugin, Message, Outcome, StageInstance};

/// Messages queued for one worker. Small, so that a slow pipeline makes the
/// source stop reading from the broker instead of buffering.
const WORKER_QUEUE: usize = 64;
/// Results queued for the sink task of one pipeline.
const RESULT_QUEUE: usize = 512;
/// Most results the sink task writes before it flushes and acknowledges.
const SINK_BATCH: usize = 256;

/// The ack tracker shared by the source (which registers each message on
/// arrival) and the sink tasks (which finish them). The lock is held only for
/// a registration or a finish, and the released acks are queued on the
/// unbounded channel while it is held, so they reach the acker in order.
pub struct AckQueue {
    tracker: std::sync::Mutex<AckTracker<(crate::mqtt::AckToken, u64)>>,
    acks: mpsc::UnboundedSender<(crate::mqtt::AckToken, u64)>,
    /// Number of the current broker connection. A packet id is only valid on
    /// the connection that delivered the message: after a reconnect the
    /// broker delivers unacknowledged messages again (kept session) or has
    /// forgotten them (no session), so an ack from an older connection is
    /// skipped instead of acknowledging whatever reuses that packet id.
    /// Shared with the acker, which must not hold the sender above: the
    /// acker ends when the last sender is gone.
    connection: Arc<AtomicU64>,
}

impl AckQueue {
    pub fn new(acks: mpsc::UnboundedSender<(crate::mqtt::AckToken, u64)>) -> Arc<Self> {
        Arc::new(Self {
            tracker: std::sync::Mutex::new(AckTracker::default()),
            acks,
            connection: Arc::new(AtomicU64::new(0)),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AckTracker<(crate::mqtt::AckToken, u64)>> {
        self.tracker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the start of a new broker connection.
    pub fn new_connection(&self) {
        self.connection.fetch_add(1, Ordering::AcqRel);
    }

    /// Marks the start of a new broker connection after the source task
    /// failed, and forgets the messages the old connection registered. The
    /// failed task lost those that were not yet handed to a worker, so they
    /// would hold back every later ack forever. None of them is acknowledged:
    /// the broker delivers them again to the new connection.
    pub fn abandon_connection(&self) -> usize {
        let mut tracker = self.lock();
        self.connection.fetch_add(1, Ordering::AcqRel);
        tracker.abandon_all()
    }

    /// Number of the current broker connection.
    pub fn connection(&self) -> u64 {
        self.connection.load(Ordering::Acquire)
    }

    /// Returns the shared connection number, which the acker reads.
    pub fn connection_counter(&self) -> Arc<AtomicU64> {
        self.connection.clone()
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
    /// Registers the message of `token`, received at `qos`, in arrival
    /// order. `pipelines` is the number of pipelines it was routed to.
    pub fn new(
        token: crate::mqtt::AckToken,
        qos: rumqttc::QoS,
        pipelines: usize,
        queue: &Arc<AckQueue>,
    ) -> Arc<Self> {
        let sequence = (qos != rumqttc::QoS::AtMostOnce)
            .then(|| queue.lock().register((token, queue.connection())));
        Arc::new(Self {
            remaining: AtomicUsize::new(pipelines),
            sequence,
            queue: queue.clone(),
        })
    }

    /// Marks one pipeline as finished; the last one releases the ack, which
    /// goes out once every earlier message was acknowledged too.
    pub fn finish(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let Some(sequence) = self.sequence else {
            return;
        };
        let mut tracker = self.queue.lock();
        for (publish, connection) in tracker.finish(sequence) {
            // The acker only stops after the source, so a send error means
            // the host is shutting down and the broker will redeliver.
            let _ = self.queue.acks.send((publish, connection));
        }
    }
}

/// One message on its way through a pipeline.
pub struct Job {
    pub message: Message,
    pub ack: Arc<AckHandle>,
}

/// What the chain of stages made of one input message.
#[derive(Debug)]
pub enum ChainResult {
    /// Every message that came out of the last stage, and `stage@version`
    /// of each stage it passed (`stage@skipped` for a stage skipped while
    /// its breaker was open).
    Outputs {
        messages: Vec<Message>,
        processed_by: Vec<String>,
    },
    /// A stage consumed the message on purpose.
    Dropped { stage: String, reason: String },
    /// A stage failed; the original message goes to the dead letters.
    Failed {
        stage: String,
        kind: FailureKind,
        reason: String,
    },
}

struct Processed {
    job: Job,
    result: ChainResult,
}

/// One stage of a pipeline as all its workers share it: the plugin slot,
/// which a reload swaps, and the stage's circuit breaker. The policy on an
/// open breaker and the retries come from the plugin's current config.
pub struct Stage {
    /// The plugin's name in the config, which names the stage too.
    pub name: String,
    pub slot: Arc<PluginSlot>,
    /// One breaker per stage and pipeline, shared by the workers so that
    /// failures on any worker count. Locked only to ask or record.
    pub breaker: std::sync::Mutex<CircuitBreaker>,
}

impl Stage {
    pub fn new(name: String, slot: Arc<PluginSlot>) -> Self {
        let breaker = new_breaker(&slot.current().1);
        Self {
            name,
            slot,
            breaker: std::sync::Mutex::new(breaker),
        }
    }

    fn breaker(&self) -> std::sync::MutexGuard<'_, CircuitBreaker> {
        self.breaker.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn breaker_state(&self) -> BreakerState {
        self.breaker().state()
    }

    /// Starts a closed breaker with the current plugin's settings, after a
    /// reload: the new version gets a fresh chance.
    pub fn reset_breaker(&self) {
        *self.breaker() = new_breaker(&self.slot.current().1);
    }
}

fn new_breaker(plugin: &LoadedPlugin) -> CircuitBreaker {
    CircuitBreaker::new(
        plugin.breaker.failure_threshold,
        Duration::from_millis(plugin.breaker.cool_down_ms),
    )
}

/// A plugin, shared by every stage that runs it. A reload replaces the
/// plugin and raises the generation; each worker notices between two
/// messages and takes a fresh instance of the new version, so a message
/// never changes version half-way.
pub struct PluginSlot {
    current: std::sync::RwLock<(u64, Arc<LoadedPlugin>)>,
}

impl PluginSlot {
    pub fn new(plugin: Arc<LoadedPlugin>) -> Self {
        Self {
            current: std::sync::RwLock::new((0, plugin)),
        }
    }

    /// Returns the generation and the plugin, read together.
    pub fn current(&self) -> (u64, Arc<LoadedPlugin>) {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        (current.0, current.1.clone())
    }

    /// Swaps in `plugin` and returns the one it replaces.
    pub fn replace(&self, plugin: Arc<LoadedPlugin>) -> Arc<LoadedPlugin> {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        current.0 += 1;
        std::mem::replace(&mut current.1, plugin)
    }
}

/// The stages of one pipeline, in order. A config reload replaces the list;
/// workers notice between two messages, and keep their instances of the
/// stages that are still in it.
pub struct StageList {
    current: std::sync::RwLock<(u64, Arc<[Arc<Stage>]>)>,
}

impl StageList {
    pub fn new(stages: Vec<Arc<Stage>>) -> Self {
        Self {
            current: std::sync::RwLock::new((0, stages.into())),
        }
    }

    /// Returns the generation and the stages, read together.
    pub fn current(&self) -> (u64, Arc<[Arc<Stage>]>) {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        (current.0, current.1.clone())
    }

    pub fn replace(&self, stages: Vec<Arc<Stage>>) {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        current.0 += 1;
        current.1 = stages.into();
    }
}

/// The running pipelines. A config reload can add and remove pipelines; the
/// source routes each message to the set it reads at that moment, and
/// subscribes and unsubscribes when the set changes.
pub struct PipelineSet {
    current: std::sync::RwLock<Arc<Vec<Arc<Pipeline>>>>,
    /// Raised on every change, for the source to follow the filters.
    changes: tokio::sync::watch::Sender<u64>,
    /// Set once the host drains; no pipeline can be added after that.
    closed: std::sync::atomic::AtomicBool,
}

impl PipelineSet {
    pub fn new(pipelines: Vec<Arc<Pipeline>>) -> Arc<Self> {
        Arc::new(Self {
            current: std::sync::RwLock::new(Arc::new(pipelines)),
            changes: tokio::sync::watch::channel(0).0,
            closed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn current(&self) -> Arc<Vec<Arc<Pipeline>>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the pipelines. A pipeline left out ends once the messages it
    /// holds are written: the last handle of its worker queues goes with
    /// the last message routed to it. Returns `false`, changing nothing,
    /// once the host drains.
    pub fn replace(&self, pipelines: Vec<Arc<Pipeline>>) -> bool {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if self.closed.load(Ordering::Acquire) {
            return false;
        }
        *current = Arc::new(pipelines);
        self.changes.send_modify(|generation| *generation += 1);
        true
    }

    /// Drops every pipeline for good, so that they drain.
    pub fn close(&self) {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        self.closed.store(true, Ordering::Release);
        *current = Arc::new(Vec::new());
    }

    /// Resolves whenever the set changes.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

/// Everything needed to start a pipeline, at start and on a reload that
/// adds one: the sinks, the dead-letter store, the supervisor, and where the sink
/// tasks are kept for the shutdown to wait on.
pub struct PipelineLauncher {
    pub sinks: std::collections::BTreeMap<String, Arc<Sink>>,
    pub dead_letters: Arc<DeadLetterStore>,
    pub supervisor: Arc<crate::supervisor::Supervisor>,
    pub sink_tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    pub events: Arc<Events>,
}

impl PipelineLauncher {
    /// Starts `config` with the plugins in `slots`.
    ///
    /// # Errors
    ///
    /// Fails when a worker cannot instantiate a stage.
    pub fn start(
        &self,
        config: &PipelineConfig,
        slots: &std::collections::BTreeMap<String, Arc<PluginSlot>>,
    ) -> anyhow::Result<Arc<Pipeline>> {
        let stages = Arc::new(StageList::new(
            config
                .stages
                .iter()
                .map(|name| Arc::new(Stage::new(name.clone(), slots[name].clone())))
                .collect(),
        ));
        let sinks = config.sinks.iter().map(|s| self.sinks[s].clone()).collect();
        let (pipeline, task) = Pipeline::start(
            config.clone(),
            stages,
            sinks,
            self.dead_letters.clone(),
            self.supervisor.clone(),
            self.events.clone(),
        )?;
        self.sink_tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(task);
        tracing::info!(
            pipeline = %config.name,
            topics = ?config.topics.iter().map(|t| t.as_str()).collect::<Vec<_>>(),
            stages = ?config.stages,
            sinks = ?config.sinks,
            workers = config.workers,
            "pipeline started"
        );
        Ok(Arc::new(pipeline))
    }

    /// Like [`PipelineLauncher::start`], on a blocking thread: each worker's
    /// first instances run the plugins' `init`, which may take long or
    /// use WASI, and neither may happen on the async runtime.
    ///
    /// # Errors
    ///
    /// Fails when a worker cannot instantiate a stage.
    pub async fn start_off_runtime(
        self: &Arc<Self>,
        config: &PipelineConfig,
        slots: &std::collections::BTreeMap<String, Arc<PluginSlot>>,
    ) -> anyhow::Result<Arc<Pipeline>> {
        let launcher = self.clone();
        let config = config.clone();
        let slots = slots.clone();
        tokio::task::spawn_blocking(move || launcher.start(&config, &slots))
            .await
            .map_err(|e| anyhow::anyhow!("starting the pipeline panicked: {e}"))?
    }

    /// Takes the sink tasks started so far.
    pub fn take_sink_tasks(&self) -> Vec<tokio::task::JoinHandle<()>> {
        std::mem::take(&mut *self.sink_tasks.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The handle the source uses to feed a pipeline.
pub struct Pipeline {
    pub config: PipelineConfig,
    pub stats: Arc<PipelineStats>,
    pub stages: Arc<StageList>,
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
        stages: Arc<StageList>,
        sinks: Vec<Arc<Sink>>,
        dead_letters: Arc<DeadLetterStore>,
        supervisor: Arc<crate::supervisor::Supervisor>,
        events: Arc<Events>,
    ) -> anyhow::Result<(Self, tokio::task::JoinHandle<()>)> {
        let stats = Arc::new(PipelineStats::default());
        let (result_tx, result_rx) = mpsc::channel(RESULT_QUEUE);

        let mut workers = Vec::with_capacity(config.workers);
        for index in 0..config.workers {
            let mut chain = Chain::new(
                config.name.clone(),
                stages.clone(),
                stats.clone(),
                events.clone(),
            );
            chain.instantiate_all()?;
            let (tx, rx) = mpsc::channel(WORKER_QUEUE);
            let results = result_tx.clone();
            let name = format!("worker {}/{index}", config.name);
            let supervisor = supervisor.clone();
            std::thread::Builder::new()
                .name(format!("eliot-{}-{index}", config.name))
                .spawn(move || run_worker(&name, chain, rx, results, &supervisor))?;
            workers.push(tx);
        }
        drop(result_tx);

        let sink_task = tokio::spawn(sink_loop(
            config.name.clone(),
            result_rx,
            sinks,
            dead_letters,
            stats.clone(),
            supervisor,
            events,
        ));
        Ok((
            Self {
                config,
                stats,
                stages,
                workers,
            },
            sink_task,
        ))
    }

    /// Index of the worker that owns `key`. Messages with the same key
    /// always go to the same worker, which keeps them in order.
    pub fn worker_for(&self, key: &str) -> usize {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut hasher);
        (hasher.finish() % self.workers.len() as u64) as usize
    }

    /// Queues `job` on worker `worker` if its queue has room, and returns
    /// the job otherwise.
    pub fn try_dispatch(&self, worker: usize, job: Job) -> Result<(), Job> {
        match self.workers[worker].try_send(job) {
            Ok(()) => {
                stats::add(&self.stats.received, 1);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(job)) => Err(job),
            Err(mpsc::error::TrySendError::Closed(job)) => {
                // The worker thread ended: the supervisor escalated and the
                // host is stopping. Unacknowledged, the message comes back
                // in the next session.
                tracing::error!(pipeline = %self.config.name, worker, topic = %job.message.topic, "worker is gone; message left unacknowledged");
                Ok(())
            }
        }
    }

    /// Waits until worker `worker` has room for one more job.
    pub async fn ready(&self, worker: usize) {
        // Reserving and dropping the permit at once wakes when there is
        // room; the job itself goes through `try_dispatch` afterwards,
        // which only the source calls, so the room is still there.
        let _ = self.workers[worker].reserve().await;
    }
}

/// Runs one worker: takes jobs in order, runs the chain, passes results on.
///
/// Supervision: a panic in the host's own code while handling a message is
/// caught here and the worker restarts one-for-one: its plugin instances are
/// rebuilt, and it keeps its queue and so the order. The message goes to
/// the dead letters as `host-panic`, because leaving it unacknowledged would
/// hold back the acknowledgement of every later message. The shared
/// [`Supervisor`](crate::supervisor::Supervisor) decides when restarts are
/// too frequent and stops the host.
fn run_worker(
    name: &str,
    mut chain: Chain,
    mut jobs: mpsc::Receiver<Job>,
    results: mpsc::Sender<Processed>,
    supervisor: &crate::supervisor::Supervisor,
) {
    while let Some(job) = jobs.blocking_recv() {
        let message = job.message.clone();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| chain.run(message)));
        let result = match outcome {
            Ok(result) => result,
            Err(panic) => {
                let reason = crate::supervisor::panic_text(&panic);
                let restart = supervisor.restarted(name, &reason);
                chain.reset();
                let failed = ChainResult::Failed {
                    stage: "worker".to_owned(),
                    kind: FailureKind::HostPanic,
                    reason: format!("the host panicked while processing the message: {reason}"),
                };
                if results
                    .blocking_send(Processed {
                        job,
                        result: failed,
                    })
                    .is_err()
                    || !restart
                {
                    return;
                }
                continue;
            }
        };
        if results.blocking_send(Processed { job, result }).is_err() {
            break;
        }
    }
}

/// A topic that contains this makes a worker panic, in builds with the
/// `fault-injection` feature, which only the test crate turns on to prove
/// supervision.
#[cfg(feature = "fault-injection")]
pub const FAULT_INJECTION_TOPIC_LEVEL: &str = "eliot-fault-injection-panic";

/// Like [`FAULT_INJECTION_TOPIC_LEVEL`], for a panic in the sink task.
#[cfg(feature = "fault-injection")]
pub const FAULT_INJECTION_SINK_TOPIC_LEVEL: &str = "eliot-fault-injection-sink-panic";

/// The stages as one worker runs them: the pipeline's stage list, and this
/// worker's own instance of each stage's current plugin version.
pub struct Chain {
    pipeline: String,
    list: Arc<StageList>,
    /// Generation of `list` that `stages` follows.
    list_generation: u64,
    stages: Vec<WorkerStage>,
    stats: Arc<PipelineStats>,
    events: Arc<Events>,
}

/// One stage as one worker runs it.
struct WorkerStage {
    stage: Arc<Stage>,
    /// The plugin version this worker runs, and its slot generation.
    plugin: Arc<LoadedPlugin>,
    generation: u64,
    /// `None` after a trap or a reload, until the next message creates one.
    instance: Option<StageInstance>,
    metrics: StageMetrics,
}

impl WorkerStage {
    fn new(stage: Arc<Stage>, pipeline: &str, events: &Events) -> Self {
        let (generation, plugin) = stage.slot.current();
        let metrics = events.stage_metrics(pipeline, &stage.name);
        Self {
            stage,
            plugin,
            generation,
            instance: None,
            metrics,
        }
    }
}

impl Chain {
    pub fn new(
        pipeline: String,
        list: Arc<StageList>,
        stats: Arc<PipelineStats>,
        events: Arc<Events>,
    ) -> Self {
        let (list_generation, stages) = list.current();
        let stages = stages
            .iter()
            .map(|stage| WorkerStage::new(stage.clone(), &pipeline, &events))
            .collect();
        Self {
            pipeline,
            list,
            list_generation,
            stages,
            stats,
            events,
        }
    }

    /// Creates every stage's instance now, so that a plugin that cannot
    /// start fails the pipeline's start instead of its first message.
    ///
    /// # Errors
    ///
    /// The first stage that fails to instantiate.
    pub fn instantiate_all(&mut self) -> Result<(), crate::wasm::LoadError> {
        for stage in &mut self.stages {
            stage.instance = Some(stage.plugin.instantiate()?);
        }
        Ok(())
    }

    /// Drops every instance; the next message creates fresh ones.
    fn reset(&mut self) {
        self.stages
            .iter_mut()
            .for_each(|stage| stage.instance = None);
    }

    /// Follows reloads, between two messages: takes the pipeline's current
    /// stage list, keeping the instances of stages still in it, and drops
    /// the instance of every stage whose plugin was swapped.
    fn follow_reloads(&mut self) {
        let (generation, list) = self.list.current();
        if generation != self.list_generation {
            let mut old = std::mem::take(&mut self.stages);
            self.stages = list
                .iter()
                .map(
                    |stage| match old.iter().position(|w| Arc::ptr_eq(&w.stage, stage)) {
                        Some(index) => old.swap_remove(index),
                        None => WorkerStage::new(stage.clone(), &self.pipeline, &self.events),
                    },
                )
                .collect();
            self.list_generation = generation;
        }
        for stage in &mut self.stages {
            let (generation, plugin) = stage.stage.slot.current();
            if generation != stage.generation {
                stage.plugin = plugin;
                stage.generation = generation;
                stage.instance = None;
            }
        }
    }

    /// Runs `message` through every stage in order.
    pub fn run(&mut self, message: Message) -> ChainResult {
        #[cfg(feature = "fault-injection")]
        if message.topic.contains(FAULT_INJECTION_TOPIC_LEVEL) {
            panic!("fault injected for topic {}", message.topic);
        }
        if let Some(limit) = message
            .headers
            .iter()
            .find(|(k, _)| k == crate::source::OVERSIZED_HEADER)
        {
            return ChainResult::Failed {
                stage: "source".to_owned(),
                kind: FailureKind::TooLarge,
                reason: format!(
                    "payload of {} bytes exceeds mqtt.max_packet_bytes ({} bytes); raise the limit or fix the device",
                    message.payload.len(),
                    limit.1
                ),
            };
        }
        self.follow_reloads();
        // One span per message and pipeline; the stage span inside it
        // names the stage and the plugin version that ran. Both are at
        // DEBUG, so that the default INFO log does not format their fields
        // for every message. NOTE: with them at INFO, `eliot-bench
        // throughput` ran slower in a few runs on 2 shared cores, but the
        // runs were too noisy to give a number. The warnings logged inside
        // the spans carry the same ids as fields.
        let span = tracing::debug_span!(
            "message",
            messaging.system = "mqtt",
            device = crate::fleet::device_of(&message.topic, &message.headers),
            topic = %message.topic,
            pipeline = %self.pipeline,
        );
        let _entered = span.enter();
        let mut current = vec![message];
        let mut processed_by = Vec::with_capacity(self.stages.len());
        for index in 0..self.stages.len() {
            let mut next = Vec::with_capacity(current.len());
            let mut drop_reason = None;
            let mut skipped = false;
            let stage_span = tracing::debug_span!(
                "stage",
                stage = %self.stages[index].stage.name,
                plugin_version = %self.stages[index].plugin.info.version,
            );
            let _stage_entered = stage_span.enter();
            let metrics = self.stages[index].metrics.clone();
            for message in &current {
                metrics.messages_in.inc();
                let started = std::time::Instant::now();
                let result = self.call_stage(index, message);
                metrics.duration.observe(started.elapsed().as_secs_f64());
                match result {
                    StageResult::Outcome(Outcome::Forward(out)) => {
                        metrics.messages_out.inc();
                        next.push(out);
                    }
                    StageResult::Outcome(Outcome::FanOut(outs)) => {
                        metrics.messages_out.inc_by(outs.len() as u64);
                        next.extend(outs);
                    }
                    StageResult::Outcome(Outcome::Drop(reason)) => drop_reason = Some(reason),
                    StageResult::Skipped => {
                        metrics.messages_out.inc();
                        skipped = true;
                        next.push(message.clone());
                    }
                    StageResult::Failed(kind, reason) => {
                        return ChainResult::Failed {
                            stage: self.stages[index].stage.name.clone(),
                            kind,
                            reason,
                        }
                    }
                }
            }
            if next.is_empty() {
                let reason =
                    drop_reason.unwrap_or_else(|| "the stage fanned out to no messages".to_owned());
                return ChainResult::Dropped {
                    stage: self.stages[index].stage.name.clone(),
                    reason,
                };
            }
            let stage = &self.stages[index];
            let version = if skipped {
                "skipped"
            } else {
                stage.plugin.info.version.as_str()
            };
            processed_by.push(format!("{}@{version}", stage.stage.name));
            current = next;
        }
        ChainResult::Outputs {
            messages: current,
            processed_by,
        }
    }

    /// Calls one stage through its breaker. A refused call follows the
    /// stage's open policy; an allowed one retries transient errors.
    fn call_stage(&mut self, index: usize, message: &Message) -> StageResult {
        let stage = self.stages[index].stage.clone();
        let on_open = self.stages[index].plugin.breaker.on_open;
        loop {
            let (permit, transition) = stage.breaker().permit(std::time::Instant::now());
            self.report(index, transition);
            match permit {
                Permit::Allowed | Permit::Trial => break,
                Permit::Refused { retry_at } => match on_open {
                    OpenPolicy::DeadLetter => {
                        return StageResult::Failed(
                            FailureKind::CircuitOpen,
                            format!("circuit breaker of stage \"{}\" is open", stage.name),
                        )
                    }
                    OpenPolicy::Skip => return StageResult::Skipped,
                    OpenPolicy::Pause => {
                        // Holding the message here stops this worker, and
                        // through the bounded queues, the source.
                        std::thread::sleep(
                            retry_at.saturating_duration_since(std::time::Instant::now()),
                        );
                    }
                },
            }
        }

        let result = self.call_with_retries(index, message);
        let transition = match &result {
            Err((FailureKind::Trap | FailureKind::Timeout | FailureKind::Transient, _)) => {
                stage.breaker().record_failure(std::time::Instant::now())
            }
            _ => stage.breaker().record_success(),
        };
        self.report(index, transition);
        match result {
            Ok(outcome) => StageResult::Outcome(outcome),
            Err((kind, reason)) => StageResult::Failed(kind, reason),
        }
    }

    fn report(&self, index: usize, transition: Option<Transition>) {
        let Some(Transition { from, to }) = transition else {
            return;
        };
        let stage = &self.stages[index].stage.name;
        if to == BreakerState::Open {
            stats::add(&self.stats.breaker_opened, 1);
            tracing::warn!(pipeline = %self.pipeline, stage, from = from.as_str(), "stage circuit breaker opened");
        } else {
            tracing::info!(pipeline = %self.pipeline, stage, from = from.as_str(), to = to.as_str(), "stage circuit breaker changed state");
        }
    }

    /// Calls one stage, retrying transient errors with exponential backoff
    /// and jitter. A trap or timeout discards the instance.
    fn call_with_retries(
        &mut self,
        index: usize,
        message: &Message,
    ) -> Result<Outcome, (FailureKind, String)> {
        let stage = &mut self.stages[index];
        let plugin = stage.plugin.clone();
        let max_retries = plugin.max_retries;
        let pipeline = self.pipeline.as_str();
        let events = &self.events;
        let slot = &mut stage.instance;
        let attempt = || -> Result<Outcome, (FailureKind, String)> {
            if slot.is_none() {
                let instance = plugin
                    .instantiate()
                    .map_err(|e| (FailureKind::Trap, e.to_string()))?;
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
                    events.plugin_failed(
                        pipeline,
                        &plugin.name,
                        &plugin.info.version,
                        &message.topic,
                        &call_error.to_string(),
                    );
                    Err((kind, call_error.to_string()))
                }
            }
        };
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(10))
            .with_max_delay(Duration::from_millis(500))
            .with_max_times(max_retries)
            .with_jitter();
        attempt
            .retry(backoff)
            .sleep(std::thread::sleep)
            .when(|(kind, _)| *kind == FailureKind::Transient)
            .call()
    }
}

enum StageResult {
    Outcome(Outcome),
    /// The breaker is open and the policy is to skip the stage.
    Skipped,
    Failed(FailureKind, String),
}

/// Writes results to the sinks in batches, stores dead letters, and only
/// then releases the acknowledgements of the batch.
///
/// Supervision: a panic in the host's own code while writing a batch is
/// caught, the whole batch goes to the dead letters as `host-panic` (some of
/// its records may already be written, so this can duplicate, never lose),
/// and the task goes on with the next batch: a one-for-one restart that
/// keeps the queue. The supervisor stops the host when restarts come too
/// often.
async fn sink_loop(
    pipeline: String,
    mut results: mpsc::Receiver<Processed>,
    sinks: Vec<Arc<Sink>>,
    dead_letters: Arc<DeadLetterStore>,
    stats: Arc<PipelineStats>,
    supervisor: Arc<crate::supervisor::Supervisor>,
    events: Arc<Events>,
) {
    use futures::FutureExt as _;

    let task = format!("sink task {pipeline}");
    let mut batch = Vec::with_capacity(SINK_BATCH);
    while results.recv_many(&mut batch, SINK_BATCH).await > 0 {
        let written = std::panic::AssertUnwindSafe(write_batch(
            &pipeline,
            &batch,
            &sinks,
            &dead_letters,
            &stats,
            &events,
        ))
        .catch_unwind()
        .await;
        let mut restart = true;
        if let Err(panic) = written {
            let reason = crate::supervisor::panic_text(&panic);
            restart = supervisor.restarted(&task, &reason);
            let letters: Vec<DeadLetter> = batch
                .iter()
                .map(|processed| DeadLetter {
                    pipeline: pipeline.clone(),
                    stage: "sink".to_owned(),
                    kind: FailureKind::HostPanic,
                    reason: format!(
                        "the host panicked while writing the message to the sinks: {reason}"
                    ),
                    message: processed.job.message.clone(),
                    topic_bytes: None,
                })
                .collect();
            let refs: Vec<&DeadLetter> = letters.iter().collect();
            retry_until_ok("dead-letter store", || dead_letters.append(&refs)).await;
            events.batch_dead_lettered(&pipeline, &stats, &letters);
        }
        for processed in batch.drain(..) {
            processed.job.ack.finish();
        }
        if !restart {
            return;
        }
    }
    // Every worker has ended: the pipeline was removed by a reload, or the
    // host stops. Its counters end with it, so they are logged here; the
    // periodic "pipeline counts" line only reads the running pipelines.
    stats
        .snapshot()
        .log(&pipeline, "pipeline finished every message it held");
}

/// Writes one batch: outputs to the sinks, failures to the dead letters,
/// then the counters.
async fn write_batch(
    pipeline: &str,
    batch: &[Processed],
    sinks: &[Arc<Sink>],
    dead_letters: &DeadLetterStore,
    stats: &PipelineStats,
    events: &Events,
) {
    let mut letters = Vec::new();
    let mut dropped = Vec::new();
    // Inputs written, with the confirmations of their republished outputs.
    let mut written = Vec::new();
    for processed in batch {
        match &processed.result {
            ChainResult::Outputs {
                messages,
                processed_by,
            } => match write_outputs(pipeline, sinks, messages, processed_by).await {
                Ok(confirmations) => written.push((processed, messages.len(), confirmations)),
                Err((stage, reason)) => {
                    letters.push(DeadLetter {
                        pipeline: pipeline.to_owned(),
                        stage,
                        kind: FailureKind::Sink,
                        reason,
                        message: processed.job.message.clone(),
                        topic_bytes: None,
                    });
                }
            },
            ChainResult::Dropped { stage, reason } => {
                dropped.push(DroppedMessage {
                    stage,
                    reason,
                    topic: &processed.job.message.topic,
                });
            }
            ChainResult::Failed {
                stage,
                kind,
                reason,
            } => {
                letters.push(DeadLetter {
                    pipeline: pipeline.to_owned(),
                    stage: stage.clone(),
                    kind: *kind,
                    reason: reason.clone(),
                    message: processed.job.message.clone(),
                    topic_bytes: None,
                });
            }
        }
    }

    for sink in sinks {
        if let SinkTarget::File(file) = &sink.target {
            write_through_breaker(pipeline, sink, || {
                file.lock().unwrap_or_else(|e| e.into_inner()).flush()
            })
            .await;
        }
    }
    // An input counts as delivered once the broker confirmed every output
    // the MQTT sinks republished for it.
    let mut delivered = 0;
    let mut records = 0;
    for (processed, outputs, confirmations) in written {
        let mut failure = None;
        for (stage, confirmation) in confirmations {
            let result = confirmation.await.unwrap_or_else(|_| {
                Err(
                    "the republish connection task ended before the broker confirmed the publish"
                        .to_owned(),
                )
            });
            if let Err(reason) = result {
                failure = Some((stage, reason));
            }
        }
        match failure {
            None => {
                delivered += 1;
                records += outputs as u64;
            }
            Some((stage, reason)) => {
                letters.push(DeadLetter {
                    pipeline: pipeline.to_owned(),
                    stage,
                    kind: FailureKind::Sink,
                    reason,
                    message: processed.job.message.clone(),
                    topic_bytes: None,
                });
            }
        }
    }
    if !letters.is_empty() {
        let refs: Vec<&DeadLetter> = letters.iter().collect();
        retry_until_ok("dead-letter store", || dead_letters.append(&refs)).await;
    }

    events.batch_finished(pipeline, stats, delivered, records, &dropped, &letters);
}

/// Writes every output of one input to every sink, and returns the
/// confirmations of what the MQTT sinks publish. A topic that cannot be built
/// fails the whole input before anything is written, so that an input is
/// either delivered in full or dead-lettered.
async fn write_outputs(
    pipeline: &str,
    sinks: &[Arc<Sink>],
    outputs: &[Message],
    processed_by: &[String],
) -> Result<Vec<(String, crate::sink::Confirmation)>, (String, String)> {
    #[cfg(feature = "fault-injection")]
    if outputs
        .iter()
        .any(|m| m.topic.contains(FAULT_INJECTION_SINK_TOPIC_LEVEL))
    {
        panic!("fault injected in the sink task");
    }
    let mut topics = Vec::new();
    for sink in sinks {
        if let SinkTarget::Mqtt(mqtt) = &sink.target {
            for message in outputs {
                let topic = mqtt
                    .topic
                    .render(pipeline, message)
                    .and_then(|topic| {
                        mqtt.check_size(&topic, &message.payload, &message.headers)
                            .map(|()| topic)
                    })
                    .map_err(|reason| (format!("sink:{}", sink.name), reason))?;
                topics.push(topic);
            }
        }
    }

    let mut topics = topics.into_iter();
    let mut confirmations = Vec::new();
    for sink in sinks {
        match &sink.target {
            SinkTarget::File(file) => {
                write_through_breaker(pipeline, sink, || {
                    let mut file = file.lock().unwrap_or_else(|e| e.into_inner());
                    outputs.iter().try_for_each(|message| {
                        file.write_record(&Record {
                            pipeline,
                            message,
                            processed_by,
                        })
                    })
                })
                .await;
            }
            SinkTarget::Mqtt(mqtt) => {
                for message in outputs {
                    let topic = topics.next().expect("one topic was rendered per output");
                    confirmations.push((
                        format!("sink:{}", sink.name),
                        mqtt.publish(topic, message.payload.clone(), message.headers.clone())
                            .await,
                    ));
                }
            }
        }
    }
    Ok(confirmations)
}

/// Retries a sink write with capped exponential backoff until it succeeds,
/// through the sink's circuit breaker: after repeated failures the breaker
/// opens and the sink is left alone for the cool-down. Nothing is
/// acknowledged meanwhile, so the broker holds the messages, and the
/// pipeline stops taking new ones because its queues fill.
async fn write_through_breaker<E: std::fmt::Display>(
    pipeline: &str,
    sink: &Sink,
    mut write: impl FnMut() -> Result<(), E>,
) {
    let mut backoff = crate::source::ReconnectBackoff::new();
    loop {
        let permit = {
            let mut breaker = sink.breaker.lock().unwrap_or_else(|e| e.into_inner());
            let (permit, transition) = breaker.permit(std::time::Instant::now());
            log_sink_transition(pipeline, &sink.name, transition);
            permit
        };
        if let Permit::Refused { retry_at } = permit {
            tokio::time::sleep_until(retry_at.into()).await;
            continue;
        }
        let result = write();
        let transition = {
            let mut breaker = sink.breaker.lock().unwrap_or_else(|e| e.into_inner());
            match &result {
                Ok(()) => breaker.record_success(),
                Err(_) => breaker.record_failure(std::time::Instant::now()),
            }
        };
        log_sink_transition(pipeline, &sink.name, transition);
        match result {
            Ok(()) => return,
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::error!(pipeline, sink = %sink.name, error = %e, retry_in_ms = delay.as_millis() as u64, "sink write failed; retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

fn log_sink_transition(pipeline: &str, sink: &str, transition: Option<Transition>) {
    let Some(Transition { from, to }) = transition else {
        return;
    };
    if to == BreakerState::Open {
        tracing::warn!(
            pipeline,
            sink,
            from = from.as_str(),
            "sink circuit breaker opened; the pipeline holds its messages"
        );
    } else {
        tracing::info!(
            pipeline,
            sink,
            from = from.as_str(),
            to = to.as_str(),
            "sink circuit breaker changed state"
        );
    }
}

/// Retries a write with capped exponential backoff until it succeeds.
async fn retry_until_ok<E: std::fmt::Display>(
    what: &str,
    mut write: impl FnMut() -> Result<(), E>,
) {
    let mut backoff = crate::source::ReconnectBackoff::new();
    loop {
        match write() {
            Ok(()) => return,
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::error!(target_store = what, error = %e, retry_in_ms = delay.as_millis() as u64, "write failed; retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}
