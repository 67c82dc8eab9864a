//! Replay: sends stored dead letters through their pipeline again, with the
//! stages and sinks of the current configuration, in this process. The input
//! does not go through the broker; only MQTT sinks publish to one.
//!
//! A dead letter that now passes is written to every sink of its pipeline
//! and then deleted from the store. One that a stage drops on purpose is
//! deleted too, as the host would have done. One that fails again stays,
//! with its new stage, kind and reason and its replay count raised by one.
//! Letters are handled in batches, and the store is changed only after the
//! batch's outputs are flushed to the file sinks and confirmed by the
//! broker, so a crash in between delivers some outputs twice but loses none.
//!
//! Before a batch runs, its letters are claimed in the store (see
//! [`DeadLetterStore::claim`]). A letter that another replay has claimed,
//! in this process or another, is skipped, so that two replays at the same moment
//! (the admin API and `eliot dead-letters replay`, say) never both send it.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use super::publish::{Publish, Publisher};
use super::{DeadLetterStore, FailureKind, ListFilter, ReplayFailure, StoredDeadLetter};
use crate::config::{Config, SinkKind};
use crate::pipeline::{Chain, ChainResult, PluginSlot, Stage, StageList};
use crate::sink::{FileSink, Record, TopicTemplate};
use crate::stats::PipelineStats;
use crate::wasm::{LoadedPlugin, Message, Runtime};

/// Dead letters handled between two updates of the store. Each batch is held
/// in memory with its payloads, up to `mqtt.max_packet_bytes` each.
const BATCH: usize = 64;

/// Time after which a replay renews the claims of its batch, checked
/// between letters. It is far below [`super::store::CLAIM_EXPIRY`], so a
/// running replay keeps its letters unless one letter runs for minutes.
const CLAIM_RENEWAL: Duration = Duration::from_secs(30);

/// Replays started by this process, for the names of their claims.
static REPLAYS_STARTED: AtomicU64 = AtomicU64::new(0);

/// The dead letters a replay takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    Ids(Vec<i64>),
    Filter(ListFilter),
}

impl Selection {
    /// Selects `ids`, each once, in the order of their first occurrence.
    pub fn ids(mut ids: Vec<i64>) -> Self {
        let mut seen = HashSet::new();
        ids.retain(|id| seen.insert(*id));
        Self::Ids(ids)
    }
}

/// Some dead letters that a replay selected by id are not in the store, so
/// nothing was replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LettersNotFound {
    /// The store's file.
    pub path: PathBuf,
    pub ids: Vec<i64>,
}

impl LettersNotFound {
    /// Returns the ids as a comma-separated list.
    pub fn id_list(&self) -> String {
        let ids: Vec<String> = self.ids.iter().map(i64::to_string).collect();
        ids.join(", ")
    }
}

impl std::fmt::Display for LettersNotFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "dead letters not found in {}: {}; nothing was replayed",
            self.path.display(),
            self.id_list()
        )
    }
}

impl std::error::Error for LettersNotFound {}

/// The broker settings of a replay's MQTT sinks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayOptions {
    /// `HOST:PORT` of the broker, in place of the one the config names.
    pub broker: Option<String>,
    /// Leave out the MQTT sinks and deliver to the file sinks only.
    pub skip_mqtt_sinks: bool,
}

/// The result of replaying one dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LetterOutcome {
    /// Written to every sink and deleted from the store.
    Delivered { records: usize },
    /// A stage dropped it on purpose; deleted from the store.
    Dropped { stage: String, reason: String },
    /// Failed again; kept, with the new failure and replay count.
    FailedAgain {
        stage: String,
        kind: FailureKind,
        reason: String,
        replay_count: u64,
    },
    /// Not sent through a pipeline, and left unchanged in the store.
    Skipped { reason: String },
}

/// Counts of one replay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplaySummary {
    pub delivered: usize,
    pub dropped: usize,
    pub failed_again: usize,
    pub skipped: usize,
}

impl ReplaySummary {
    fn add(&mut self, outcome: &LetterOutcome) {
        match outcome {
            LetterOutcome::Delivered { .. } => self.delivered += 1,
            LetterOutcome::Dropped { .. } => self.dropped += 1,
            LetterOutcome::FailedAgain { .. } => self.failed_again += 1,
            LetterOutcome::Skipped { .. } => self.skipped += 1,
        }
    }
}

/// Replays the selected dead letters of `store` through the pipelines of
/// `config`, and calls `report` for each letter once the store reflects its
/// outcome.
///
/// Letters that another replay has claimed, or that were deleted after the
/// replay started, are reported as skipped.
///
/// # Errors
///
/// Fails before anything is replayed when a selected id does not exist
/// (with [`LettersNotFound`]), a plugin does not load, a file sink cannot
/// be opened, or an MQTT sink has no reachable broker (see
/// [`ReplayOptions`]). Fails during the replay when a sink write or the
/// store fails. The batch in progress then stays in the store unchanged,
/// and batches before it are done.
pub async fn replay(
    config: &Config,
    store: &DeadLetterStore,
    selection: &Selection,
    options: &ReplayOptions,
    mut report: impl FnMut(i64, &LetterOutcome),
) -> anyhow::Result<ReplaySummary> {
    // Letters chosen by id are read first, so that a wrong id fails before
    // anything changes.
    let chosen = match selection {
        Selection::Ids(ids) => Some(read_ids(store, ids)?),
        Selection::Filter(_) => None,
    };
    let pipelines: BTreeSet<String> = match (&chosen, selection) {
        (Some(letters), _) => letters.iter().map(|l| l.pipeline.clone()).collect(),
        (None, Selection::Filter(filter)) => store.pipelines(filter)?.into_iter().collect(),
        (None, Selection::Ids(_)) => unreachable!("ids are read above"),
    };
    let mut replayer = Replayer::start(config, &pipelines, options).await?;

    let mut summary = ReplaySummary::default();
    let result = match (chosen, selection) {
        (Some(letters), _) => {
            let ids: Vec<i64> = letters.iter().map(|letter| letter.id).collect();
            let mut result = Ok(());
            for batch in ids.chunks(BATCH) {
                result = replayer
                    .replay_ids(store, batch, &mut summary, &mut report)
                    .await;
                if result.is_err() {
                    break;
                }
            }
            result.map(|()| summary)
        }
        (None, Selection::Filter(filter)) => {
            replay_filtered(&mut replayer, store, filter, &mut summary, &mut report)
                .await
                .map(|()| summary)
        }
        (None, Selection::Ids(_)) => unreachable!("ids are read above"),
    };
    replayer.finish().await;
    result
}

/// Reads the letters `ids`, each once.
///
/// # Errors
///
/// [`LettersNotFound`] when any of them is not in the store.
fn read_ids(store: &DeadLetterStore, ids: &[i64]) -> anyhow::Result<Vec<StoredDeadLetter>> {
    let mut letters = Vec::with_capacity(ids.len());
    let mut missing = Vec::new();
    let mut seen = HashSet::new();
    for &id in ids.iter().filter(|id| seen.insert(**id)) {
        match store.get(id)? {
            Some(letter) => letters.push(letter),
            None => missing.push(id),
        }
    }
    if !missing.is_empty() {
        return Err(LettersNotFound {
            path: store.path().to_owned(),
            ids: missing,
        }
        .into());
    }
    Ok(letters)
}

/// Pages through the letters that match `filter`, up to the last one stored
/// when the replay started: letters the running host adds meanwhile, and
/// letters that fail again, are not taken a second time.
async fn replay_filtered(
    replayer: &mut Replayer,
    store: &DeadLetterStore,
    filter: &ListFilter,
    summary: &mut ReplaySummary,
    report: &mut impl FnMut(i64, &LetterOutcome),
) -> anyhow::Result<()> {
    let Some(last_id) = store.last_id()? else {
        return Ok(());
    };
    let mut remaining = filter.limit.unwrap_or(usize::MAX);
    let mut after_id = filter.after_id;
    while remaining > 0 {
        let page = ListFilter {
            limit: Some(remaining.min(BATCH)),
            after_id,
            ..filter.clone()
        };
        let mut letters = store.list(&page)?;
        letters.retain(|letter| letter.id <= last_id);
        let Some(last) = letters.last() else { break };
        after_id = Some(last.id);
        remaining -= letters.len();
        let ids: Vec<i64> = letters.iter().map(|letter| letter.id).collect();
        replayer.replay_ids(store, &ids, summary, report).await?;
    }
    Ok(())
}

/// One pipeline as replay runs it: its chain and the names of its sinks.
struct Route {
    /// Taken out while the chain runs on a blocking thread.
    chain: Option<Chain>,
    file_sinks: Vec<String>,
    mqtt_sinks: Vec<MqttTarget>,
}

struct MqttTarget {
    name: String,
    topic: TopicTemplate,
    qos: rumqttc::QoS,
    retain: bool,
}

/// The outputs of one letter, ready to be written.
struct Delivery {
    pipeline: String,
    messages: Vec<Message>,
    processed_by: Vec<String>,
    /// One topic per MQTT sink and message, sink by sink.
    topics: Vec<String>,
}

struct Replayer {
    config_file: PathBuf,
    routes: BTreeMap<String, Route>,
    files: BTreeMap<String, FileSink>,
    publisher: Option<Publisher>,
    /// Name under which this replay claims letters in the store: the
    /// process id and a count of this process's replays, so that no two
    /// running replays share it.
    claimer: String,
    /// When the claims of the current batch were taken or last renewed.
    claims_renewed: Instant,
    // Kept alive for the epoch ticker and the compiled components.
    _runtime: Option<Arc<Runtime>>,
}

impl Replayer {
    /// Loads the plugins of `pipelines`, opens their file sinks and
    /// connects for their MQTT sinks. Pipelines missing from the config are
    /// left out; their letters are skipped.
    async fn start(
        config: &Config,
        pipelines: &BTreeSet<String>,
        options: &ReplayOptions,
    ) -> anyhow::Result<Self> {
        let present: Vec<&crate::config::PipelineConfig> = pipelines
            .iter()
            .filter_map(|name| config.pipelines.get(name))
            .collect();
        let replay_number = REPLAYS_STARTED.fetch_add(1, Ordering::Relaxed) + 1;
        let mut replayer = Self {
            config_file: config.file.clone(),
            routes: BTreeMap::new(),
            files: BTreeMap::new(),
            publisher: None,
            claimer: format!("pid {} replay {replay_number}", std::process::id()),
            claims_renewed: Instant::now(),
            _runtime: None,
        };
        if present.is_empty() {
            return Ok(replayer);
        }

        let runtime = Arc::new(Runtime::new(&config.cache_dir)?);
        let mut plugins: BTreeMap<String, Arc<LoadedPlugin>> = BTreeMap::new();
        for name in present.iter().flat_map(|p| p.stages.iter()) {
            if plugins.contains_key(name) {
                continue;
            }
            let plugin_config = config.plugins[name].clone();
            let loader = runtime.clone();
            let loaded =
                tokio::task::spawn_blocking(move || LoadedPlugin::load(&loader, &plugin_config))
                    .await
                    .context("loading a plugin panicked")??;
            plugins.insert(name.clone(), Arc::new(loaded));
        }

        let mut mqtt_users = Vec::new();
        for pipeline in &present {
            let stages = Arc::new(StageList::new(
                pipeline
                    .stages
                    .iter()
                    .map(|s| {
                        let slot = Arc::new(PluginSlot::new(plugins[s].clone()));
                        Arc::new(Stage::new(s.clone(), slot))
                    })
                    .collect(),
            ));
            let chain = Chain::new(
                pipeline.name.clone(),
                stages,
                Arc::new(PipelineStats::default()),
                // A replay's counts stay out of the running host's metrics.
                Arc::new(crate::events::Events::default()),
            );
            let mut route = Route {
                chain: Some(chain),
                file_sinks: Vec::new(),
                mqtt_sinks: Vec::new(),
            };
            for name in &pipeline.sinks {
                match &config.sinks[name].kind {
                    SinkKind::File { path } => {
                        if !replayer.files.contains_key(name) {
                            replayer.files.insert(name.clone(), FileSink::open(path)?);
                        }
                        route.file_sinks.push(name.clone());
                    }
                    SinkKind::Mqtt { topic, qos, retain } => {
                        mqtt_users.push(format!("\"{name}\" of pipeline \"{}\"", pipeline.name));
                        if options.skip_mqtt_sinks {
                            tracing::warn!(pipeline = %pipeline.name, sink = %name, "MQTT sink skipped (--skip-mqtt-sinks): replayed messages are not published to it");
                        } else {
                            route.mqtt_sinks.push(MqttTarget {
                                name: name.clone(),
                                topic: topic.clone(),
                                qos: *qos,
                                retain: *retain,
                            });
                        }
                    }
                }
            }
            replayer.routes.insert(pipeline.name.clone(), route);
        }

        if !mqtt_users.is_empty() && !options.skip_mqtt_sinks {
            let (host, port) = broker_address(config, options.broker.as_deref(), &mqtt_users)?;
            let client_id = format!("{}-replay-{}", config.mqtt.client_id, std::process::id());
            // The TLS, credential and protocol settings of [mqtt] apply to
            // --broker too: it names another address of the same broker.
            let endpoint = crate::mqtt::Endpoint::new(&config.mqtt, host, port)
                .map_err(|e| anyhow::anyhow!("mqtt.tls.{}: {e}; {}", e.key(), e.fix()))?;
            let publisher = Publisher::connect(&endpoint, client_id, config.mqtt.max_packet_bytes)
                .await
                .with_context(|| {
                    format!(
                        "the MQTT sink {} needs the broker; start it (for the embedded broker, start the host), \
                         pass --broker HOST:PORT, or pass --skip-mqtt-sinks",
                        mqtt_users.join(", ")
                    )
                })?;
            tracing::info!(
                broker = publisher.address(),
                "replay publishes the MQTT sinks' messages to this broker"
            );
            replayer.publisher = Some(publisher);
        }
        replayer._runtime = Some(runtime);
        Ok(replayer)
    }

    /// Claims the letters `ids`, replays the ones it got, and releases the
    /// claims that remain afterwards, also when the batch fails. Letters
    /// that another replay has claimed, or that are gone, are reported as
    /// skipped.
    async fn replay_ids(
        &mut self,
        store: &DeadLetterStore,
        ids: &[i64],
        summary: &mut ReplaySummary,
        report: &mut impl FnMut(i64, &LetterOutcome),
    ) -> anyhow::Result<()> {
        let claimed = store.claim(ids, &self.claimer, crate::clock::now_ms())?;
        self.claims_renewed = Instant::now();
        for expired in &claimed.taken_over {
            tracing::warn!(
                id = expired.id,
                claimer = %expired.claimer,
                claimed_at = %crate::clock::rfc3339_ms(expired.claimed_at_ms),
                "took over the expired claim of a replay that stopped; the letter may have been delivered once already"
            );
        }
        for claim in &claimed.claimed_by_others {
            let reason = format!(
                "another replay is sending it ({} claimed it at {})",
                claim.claimer,
                crate::clock::rfc3339_ms(claim.claimed_at_ms)
            );
            let outcome = LetterOutcome::Skipped { reason };
            summary.add(&outcome);
            report(claim.id, &outcome);
        }
        for &id in &claimed.missing {
            let reason =
                "it is no longer in the store; another replay or a purge removed it".to_owned();
            let outcome = LetterOutcome::Skipped { reason };
            summary.add(&outcome);
            report(id, &outcome);
        }

        let result = self
            .replay_batch(store, &claimed.letters, summary, report)
            .await;
        // Delivered and dropped letters are gone with their claims. The
        // claims of the others end here, so the next replay can take them.
        let claimed_ids: Vec<i64> = claimed.letters.iter().map(|letter| letter.id).collect();
        let released = store.release(&claimed_ids, &self.claimer);
        result?;
        released?;
        Ok(())
    }

    /// Renews the claims of the batch when [`CLAIM_RENEWAL`] has passed
    /// since they were taken or last renewed.
    fn renew_claims_when_due(&mut self, store: &DeadLetterStore) -> anyhow::Result<()> {
        if self.claims_renewed.elapsed() >= CLAIM_RENEWAL {
            store.renew_claims(&self.claimer, crate::clock::now_ms())?;
            self.claims_renewed = Instant::now();
        }
        Ok(())
    }

    async fn replay_batch(
        &mut self,
        store: &DeadLetterStore,
        letters: &[StoredDeadLetter],
        summary: &mut ReplaySummary,
        report: &mut impl FnMut(i64, &LetterOutcome),
    ) -> anyhow::Result<()> {
        let mut outcomes = Vec::with_capacity(letters.len());
        let mut deliveries = Vec::new();
        for letter in letters {
            self.renew_claims_when_due(store)?;
            let outcome = self.run_letter(letter, &mut deliveries).await?;
            outcomes.push((letter, outcome));
        }

        self.renew_claims_when_due(store)?;
        self.deliver(&deliveries).await?;

        let mut finished = Vec::new();
        let mut failures = Vec::new();
        for (letter, outcome) in &outcomes {
            match outcome {
                LetterOutcome::Delivered { .. } | LetterOutcome::Dropped { .. } => {
                    finished.push(letter.id)
                }
                LetterOutcome::FailedAgain {
                    stage,
                    kind,
                    reason,
                    ..
                } => failures.push(ReplayFailure {
                    id: letter.id,
                    stage: stage.clone(),
                    kind: *kind,
                    reason: reason.clone(),
                }),
                LetterOutcome::Skipped { .. } => {}
            }
        }
        store.delete(&finished)?;
        store.mark_replayed(&failures)?;

        for (letter, outcome) in &outcomes {
            summary.add(outcome);
            report(letter.id, outcome);
        }
        Ok(())
    }

    /// Runs one letter through its chain and returns its outcome. When it
    /// passed, its outputs are added to `deliveries`, and `Delivered` is true
    /// once [`Replayer::deliver`] has written them.
    async fn run_letter(
        &mut self,
        letter: &StoredDeadLetter,
        deliveries: &mut Vec<Delivery>,
    ) -> anyhow::Result<LetterOutcome> {
        let Some(route) = self.routes.get_mut(&letter.pipeline) else {
            let reason = format!(
                "pipeline \"{}\" is not in {}",
                letter.pipeline,
                self.config_file.display()
            );
            return Ok(LetterOutcome::Skipped { reason });
        };
        let Some(message) = letter.message() else {
            let reason = "its topic is not valid UTF-8, so no plugin can receive it".to_owned();
            return Ok(LetterOutcome::Skipped { reason });
        };

        let mut chain = route
            .chain
            .take()
            .expect("the chain is put back after every letter");
        let (chain, result) = tokio::task::spawn_blocking(move || {
            let result = chain.run(message);
            (chain, result)
        })
        .await
        .context("the plugin chain panicked")?;
        route.chain = Some(chain);

        let failed_again =
            |stage: String, kind: FailureKind, reason: String| LetterOutcome::FailedAgain {
                stage,
                kind,
                reason,
                replay_count: letter.replay_count + 1,
            };
        match result {
            ChainResult::Dropped { stage, reason } => Ok(LetterOutcome::Dropped { stage, reason }),
            ChainResult::Failed {
                stage,
                kind,
                reason,
            } => Ok(failed_again(stage, kind, reason)),
            ChainResult::Outputs {
                messages,
                processed_by,
            } => {
                // Every topic is built before anything is written, so that a
                // letter is delivered in full or not at all.
                let mut topics = Vec::new();
                for target in &route.mqtt_sinks {
                    for message in &messages {
                        match target.topic.render(&letter.pipeline, message) {
                            Ok(topic) => topics.push(topic),
                            Err(reason) => {
                                return Ok(failed_again(
                                    format!("sink:{}", target.name),
                                    FailureKind::Sink,
                                    reason,
                                ))
                            }
                        }
                    }
                }
                let records = messages.len();
                deliveries.push(Delivery {
                    pipeline: letter.pipeline.clone(),
                    messages,
                    processed_by,
                    topics,
                });
                Ok(LetterOutcome::Delivered { records })
            }
        }
    }

    /// Writes and flushes every delivery to its file sinks, then publishes
    /// to the MQTT sinks and waits for the broker's confirmations.
    async fn deliver(&mut self, deliveries: &[Delivery]) -> anyhow::Result<()> {
        // NOTE: the host may append to the same files at the same time. Each
        // replayed record goes out in one write, but a record the host
        // writes can span two writes, so the lines of both can interleave
        // in rare cases. Replay while the host is stopped to rule this out.
        let mut publishes = Vec::new();
        for delivery in deliveries {
            let route = &self.routes[&delivery.pipeline];
            for name in &route.file_sinks {
                let file = self
                    .files
                    .get_mut(name)
                    .expect("every file sink of a route is open");
                for message in &delivery.messages {
                    let record = Record {
                        pipeline: &delivery.pipeline,
                        message,
                        processed_by: &delivery.processed_by,
                    };
                    file.write_record(&record)?;
                    file.flush()?;
                }
            }
            let mut topics = delivery.topics.iter();
            for target in &route.mqtt_sinks {
                for message in &delivery.messages {
                    publishes.push(Publish {
                        topic: topics
                            .next()
                            .expect("one topic was rendered per sink and message")
                            .clone(),
                        payload: message.payload.clone(),
                        qos: target.qos,
                        retain: target.retain,
                        headers: message.headers.clone(),
                    });
                }
            }
        }
        if let Some(publisher) = &mut self.publisher {
            if !publishes.is_empty() {
                publisher.publish_all(publishes).await?;
            }
        }
        Ok(())
    }

    async fn finish(self) {
        if let Some(publisher) = self.publisher {
            publisher.disconnect().await;
        }
    }
}

/// Finds the broker for the MQTT sinks: `--broker`, else `mqtt.broker`, else
/// the embedded broker's `listen` address when its port is fixed. Only the
/// running host has the address of an embedded broker on port 0.
fn broker_address(
    config: &Config,
    broker: Option<&str>,
    mqtt_users: &[String],
) -> anyhow::Result<(String, u16)> {
    if let Some(broker) = broker {
        return crate::broker::parse_address(broker).with_context(|| {
            format!("--broker \"{broker}\" is not HOST:PORT, for example 127.0.0.1:1883")
        });
    }
    if config.mqtt.broker != "embedded" {
        return config
            .mqtt
            .address()
            .with_context(|| format!("mqtt.broker \"{}\" is not HOST:PORT", config.mqtt.broker));
    }
    let listen: std::net::SocketAddr = config
        .embedded_broker
        .listen
        .parse()
        .context("embedded_broker.listen")?;
    if listen.port() != 0 {
        return Ok((listen.ip().to_string(), listen.port()));
    }
    bail!(
        "the MQTT sink {} needs a broker, but {} uses the embedded broker on a free port \
         (embedded_broker.listen = \"{}\"), whose address only the running host knows; pass --broker \
         with the address the host logged as \"embedded broker listening\", or --skip-mqtt-sinks to \
         deliver to the other sinks only",
        mqtt_users.join(", "),
        config.file.display(),
        config.embedded_broker.listen
    )
}
