//! The MQTT source: one connection that subscribes to every pipeline's
//! filters, routes each message to the pipelines whose filters match, and
//! acknowledges it once they are all done.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::{mpsc, watch};

use crate::events::Events;
use crate::mqtt::{AckToken, Client, Endpoint, Event, EventLoop, Incoming, QoS};
use crate::pipeline::{AckHandle, AckQueue, Job, Pipeline, PipelineSet};
use crate::stats;
use crate::wasm::{Message, Qos};

/// Reconnect delays: exponential from 100 ms to 10 s, with jitter so that a
/// fleet of hosts does not reconnect in lockstep after a broker restart.
pub struct ReconnectBackoff {
    delays: backon::ExponentialBackoff,
}

impl ReconnectBackoff {
    pub fn new() -> Self {
        Self {
            delays: Self::builder().build(),
        }
    }

    fn builder() -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(10))
            .without_max_times()
            .with_jitter()
    }

    pub fn next_delay(&mut self) -> Duration {
        self.delays.next().unwrap_or(Duration::from_secs(10))
    }

    pub fn reset(&mut self) {
        self.delays = Self::builder().build();
    }
}

impl Default for ReconnectBackoff {
    fn default() -> Self {
        Self::new()
    }
}

/// Connection settings of the source.
#[derive(Clone)]
pub struct SourceOptions {
    pub endpoint: Endpoint,
    pub client_id: String,
    pub max_packet_bytes: usize,
}

/// Consecutive rejections (refused connects, certificates that fail
/// verification, refused subscriptions) after which the source gives up and
/// the host exits with the error. A rejection repeats with the same
/// settings, so retrying for ever would only hide it. Five attempts take
/// 1.5 to 3 s with the backoff and its jitter, which rides out a broker
/// whose authentication backend is still loading after a restart.
pub const MAX_REJECTIONS: u32 = 5;

/// Connects and returns the client and its event loop. Acknowledgements are
/// manual: the host sends PUBACK only after the sinks took a message.
pub fn connect(options: &SourceOptions) -> (Client, EventLoop) {
    crate::mqtt::connect(
        &options.endpoint,
        &crate::mqtt::Session {
            client_id: &options.client_id,
            persistent: true,
            manual_acks: true,
            // The client accepts packets up to the protocol's maximum, and
            // the router dead-letters payloads over the configured limit. A
            // limit in the client would fail the whole connection instead,
            // and the broker would deliver the same message again after
            // every reconnect, forever.
            max_incoming_bytes: crate::mqtt::MQTT_MAX_PACKET,
            max_outgoing_bytes: options.max_packet_bytes,
            capacity: 1024,
            // The broker's in-flight window on MQTT 5, as Mosquitto's
            // max_inflight_messages is on 3.1.1. Held acks keep that many
            // messages in the host, so it stays within MAX_PENDING: the
            // source then never stops polling for QoS 1 and 2 messages,
            // and keepalive pings go out while the pipelines are full.
            receive_maximum: Some(MAX_PENDING as u16),
        },
    )
}

/// The reason [`run`] returned.
pub enum Stopped {
    /// Shutdown was asked for.
    Shutdown,
    /// The broker rejected the host [`MAX_REJECTIONS`] times in a row; the
    /// text names the cause and the fix.
    Rejected(String),
}

/// Reads messages until `shutdown` turns true, or until the broker rejected
/// the host [`MAX_REJECTIONS`] times in a row, and returns the connection,
/// which [`drain`] then keeps polled while the last acks go out.
///
/// Reconnects with backoff after a connection error and subscribes again
/// on every connect.
// The arguments are the state the supervisor keeps across restarts; a
// struct for them would only move the list.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    client: Client,
    mut eventloop: EventLoop,
    set: &PipelineSet,
    ack_queue: &Arc<AckQueue>,
    mut shutdown: watch::Receiver<bool>,
    connected: &watch::Sender<bool>,
    max_payload_bytes: usize,
    events: &Events,
) -> ((Client, EventLoop), Stopped) {
    let mut backoff = ReconnectBackoff::new();
    // Rejections since the source was last fully subscribed.
    let mut rejections = 0u32;
    let mut stopped = Stopped::Shutdown;
    // Messages read from the broker and not yet taken by a worker, in
    // arrival order. While it has room the event loop keeps being polled, so
    // keepalive pings go out even when the pipelines are full. At QoS 1 and 2
    // the broker's in-flight window bounds it; only a QoS 0 flood fills it,
    // and then the source stops reading until the workers catch up.
    let mut pending: VecDeque<Routed> = VecDeque::new();
    // Subscriptions sent and not yet acknowledged, in request order, which
    // is the order of the broker's SUBACKs.
    let mut awaiting_subacks: VecDeque<String> = VecDeque::new();
    let mut changes = set.changes();
    // Filters subscribed on this connection, with their QoS.
    let mut subscribed: Subscriptions = BTreeMap::new();
    let mut filters_changed = false;
    // ConnAcks on this source so far: the first has no session to expect.
    let mut connects = 0u64;
    loop {
        if std::mem::take(&mut filters_changed) {
            let pipelines = set.current();
            let sent = follow_filters(&client, &pipelines, events, &mut subscribed).await;
            awaiting_subacks.extend(sent);
        }
        // Hand over what the workers have room for, oldest first.
        while let Some(routed) = pending.pop_front() {
            if let Err(job) = routed.pipeline.try_dispatch(routed.worker, routed.job) {
                pending.push_front(Routed { job, ..routed });
                break;
            }
        }
        let blocked = pending.front().map(|r| (r.pipeline.clone(), r.worker));

        let event = tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => break,
            () = async {
                match &blocked {
                    Some((pipeline, worker)) => pipeline.ready(*worker).await,
                    None => std::future::pending().await,
                }
            } => continue,
            changed = changes.changed() => {
                filters_changed = changed.is_ok();
                continue;
            }
            event = eventloop.poll(), if pending.len() < MAX_PENDING => event,
        };
        let pipelines = set.current();
        match event {
            Ok(Event::Publish(publish)) => {
                route(
                    &pipelines,
                    *publish,
                    ack_queue,
                    max_payload_bytes,
                    &mut pending,
                    events,
                );
            }
            Ok(Event::ConnAck { session_present }) => {
                backoff.reset();
                ack_queue.new_connection();
                tracing::info!(session_present, "connected to the broker");
                if !session_present && connects > 0 {
                    // A reconnect found no session: the broker dropped it (it
                    // restarted without persistence, the session expired, or
                    // another client took over this client id), and with it
                    // what it had queued for the host meanwhile.
                    tracing::warn!(
                        "the broker kept no session for this client id; messages queued for the host while it \
                         was away are gone, unless a short mqtt.session_expiry_secs ended the session on purpose \
                         (check the broker's persistence and that no other client uses this client id)"
                    );
                }
                connects += 1;
                // Subscribe on every connect, also when the broker kept the
                // session: the configuration may have gained filters since.
                // Subscribing again to a kept filter replaces it and keeps
                // its queued messages. Ready only once the broker confirmed
                // every filter, because what is published before that
                // reaches no subscriber.
                subscribed.clear();
                awaiting_subacks = follow_filters(&client, &pipelines, events, &mut subscribed)
                    .await
                    .into();
                if awaiting_subacks.is_empty() {
                    rejections = 0;
                    connected.send_replace(true);
                }
            }
            Ok(Event::SubAck { pkid, refused }) => {
                let filter = awaiting_subacks.pop_front().unwrap_or_default();
                if refused > 0 {
                    // A pipeline without its filter would look healthy and
                    // receive nothing, so a refusal counts as a rejection:
                    // retried a few times, then the host stops.
                    // NOTE: no test covers this branch. Mosquitto 2.0.11
                    // grants a subscription its ACL forbids and filters at
                    // delivery instead; only brokers that check the ACL at
                    // subscribe time refuse in the SUBACK.
                    rejections += 1;
                    let error = format!(
                        "the broker refused the subscription to \"{filter}\"; allow this user to read it in the broker's ACL, or correct the pipeline's topics"
                    );
                    if rejections >= MAX_REJECTIONS {
                        tracing::error!(error, rejections, "giving up");
                        stopped = Stopped::Rejected(error);
                        break;
                    }
                    let delay = backoff.next_delay();
                    tracing::error!(
                        error,
                        pkid,
                        rejections,
                        retry_in_ms = delay.as_millis() as u64,
                        "subscription refused"
                    );
                    tokio::select! {
                        _ = shutdown.wait_for(|stop| *stop) => break,
                        () = tokio::time::sleep(delay) => {}
                    }
                    // Subscribe again to everything; a filter already
                    // granted is only replaced.
                    subscribed.clear();
                    filters_changed = true;
                } else {
                    tracing::info!(pkid, filter, "subscribed");
                }
                if awaiting_subacks.is_empty() && !filters_changed {
                    rejections = 0;
                    connected.send_replace(true);
                }
            }
            Ok(_) => {}
            Err(e) => {
                connected.send_replace(false);
                if e.rejected {
                    rejections += 1;
                    if rejections >= MAX_REJECTIONS {
                        tracing::error!(error = %e, rejections, "the broker rejected every attempt; giving up");
                        stopped = Stopped::Rejected(e.text);
                        break;
                    }
                }
                let delay = backoff.next_delay();
                if e.rejected {
                    tracing::error!(error = %e, rejections, retry_in_ms = delay.as_millis() as u64, "broker rejected the connection");
                } else {
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "broker connection failed");
                }
                tokio::select! {
                    _ = shutdown.wait_for(|stop| *stop) => break,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }

    // Messages still pending were never handed to a worker and stay
    // unacknowledged.
    drop(pending);
    ((client, eventloop), stopped)
}

/// Drains after [`run`] returned: dropping the last handles of the
/// pipelines and of the ack queue lets the workers, the sink tasks and then
/// the acker finish, while the connection is kept polled so that their
/// acks go out. Then disconnects. Messages that arrive while draining are
/// left unacknowledged, so the broker delivers them again to the next
/// session.
pub async fn drain(
    (client, mut eventloop): (Client, EventLoop),
    set: &PipelineSet,
    ack_queue: Arc<AckQueue>,
    mut acker: tokio::task::JoinHandle<()>,
    connected: &watch::Sender<bool>,
) {
    set.close();
    drop(ack_queue);
    loop {
        tokio::select! {
            _ = &mut acker => break,
            event = eventloop.poll() => {
                if event.is_err() {
                    // Without a connection the acks cannot go out; the broker
                    // redelivers those messages to the next session.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    if client.disconnect().await.is_ok() {
        // Poll until the disconnect is written; bounded by the caller's
        // shutdown deadline.
        while eventloop.poll().await.is_ok() {}
    }
    connected.send_replace(false);
}

/// Filters subscribed on the current connection, with their QoS.
type Subscriptions = BTreeMap<String, QoS>;

/// Subscribes every filter of `pipelines` and the device status filter that
/// is not in `subscribed` (or whose QoS changed), and unsubscribes every
/// filter no pipeline has any more, one request each. Returns the filters of
/// the subscribe requests queued, in order.
async fn follow_filters(
    client: &Client,
    pipelines: &[Arc<Pipeline>],
    events: &Events,
    subscribed: &mut Subscriptions,
) -> Vec<String> {
    let mut wanted = Subscriptions::new();
    if let Some(filter) = &events.status_topic {
        // QoS 1, so that a device's last will is not lost on the way.
        wanted.insert(filter.as_str().to_owned(), QoS::AtLeastOnce);
    }
    for pipeline in pipelines {
        // NOTE: a pipeline in a share group and another one outside it on
        // the same filter make two subscriptions. The broker delivers a
        // message on both, so each pipeline gets it twice.
        for filter in pipeline.config.subscriptions() {
            // Two pipelines on one filter: the higher QoS serves both.
            let qos = wanted.entry(filter).or_insert(QoS::AtMostOnce);
            if pipeline.config.qos > *qos {
                *qos = pipeline.config.qos;
            }
        }
    }
    let mut queued = Vec::new();
    for (filter, qos) in &wanted {
        if subscribed.get(filter) == Some(qos) {
            continue;
        }
        // The request only fails once the event loop is gone, and then the
        // next ConnAck subscribes again.
        // The device status topic's retained messages are wanted again
        // after a restart, which keeps the session but not the registry.
        let status = events
            .status_topic
            .as_ref()
            .is_some_and(|f| f.as_str() == filter);
        match client.subscribe(filter.as_str(), *qos, status).await {
            Ok(()) => queued.push(filter.clone()),
            Err(e) => tracing::error!(filter, error = %e, "subscribe request failed"),
        }
    }
    for filter in subscribed.keys().filter(|f| !wanted.contains_key(*f)) {
        match client.unsubscribe(filter.as_str()).await {
            Ok(()) => tracing::info!(
                filter,
                "unsubscribed: no pipeline reads this filter any more"
            ),
            Err(e) => tracing::error!(filter, error = %e, "unsubscribe request failed"),
        }
    }
    *subscribed = wanted;
    queued
}

/// Most messages read from the broker but not yet taken by a worker.
const MAX_PENDING: usize = 1000;

/// A message bound for one worker of one pipeline.
struct Routed {
    pipeline: Arc<Pipeline>,
    worker: usize,
    job: Job,
}

/// Routes one message to every pipeline with a matching filter, appending
/// one job per pipeline to `pending`.
fn route(
    pipelines: &[Arc<Pipeline>],
    publish: Incoming,
    acks: &Arc<AckQueue>,
    max_payload_bytes: usize,
    pending: &mut VecDeque<Routed>,
    events: &Events,
) {
    #[cfg(feature = "fault-injection")]
    if publish.topic.contains(FAULT_INJECTION_SOURCE_TOPIC_LEVEL) && inject_once(&SOURCE_FAULT) {
        panic!("fault injected in the source for topic {}", publish.topic);
    }
    let matching: Vec<&Arc<Pipeline>> = pipelines
        .iter()
        .filter(|p| p.config.topics.iter().any(|f| f.matches(&publish.topic)))
        .collect();
    let Incoming {
        topic,
        payload,
        qos,
        retain,
        headers,
        ack,
    } = publish;
    let status = events
        .status_topic
        .as_ref()
        .is_some_and(|filter| filter.matches(&topic));
    if status {
        events.device_status(&topic, &payload);
    }
    let ack = AckHandle::new(ack, qos, matching.len().max(1), acks);
    if matching.is_empty() && status {
        ack.finish();
        return;
    }
    if matching.is_empty() {
        // Can happen with overlapping subscriptions kept from an older
        // configuration in a persistent session.
        events.message_unrouted(&topic);
        ack.finish();
        return;
    }

    let mut received = Message {
        topic,
        payload,
        qos: match qos {
            QoS::AtMostOnce => Qos::AtMostOnce,
            QoS::AtLeastOnce => Qos::AtLeastOnce,
            QoS::ExactlyOnce => Qos::ExactlyOnce,
        },
        retain,
        received_at_ms: crate::clock::now_ms(),
        headers,
    };
    if received.payload.len() > max_payload_bytes {
        // Marked here, dead-lettered by the workers without calling a
        // plugin, so that the stored message keeps its place in the order.
        received
            .headers
            .push((OVERSIZED_HEADER.to_owned(), max_payload_bytes.to_string()));
    }
    // The device registry counts the message once, under the id the first
    // pipeline's device key gave, or the topic's second level without one.
    let mut registered_id: Option<String> = None;
    for pipeline in matching {
        let mut message = received.clone();
        let key = &pipeline.config.device_key;
        // NOTE: a payload key parses each message's JSON here, on the one
        // source task, before a worker has it; its cost was not measured.
        let worker = match crate::device::device_id(key, &received.topic, &received.payload) {
            Ok(id) => {
                if key.names_device() {
                    // The pipeline's key replaces any `device_id` header the
                    // device sent itself, so that plugins see the id the
                    // order was kept by.
                    message
                        .headers
                        .retain(|(name, _)| name != crate::device::DEVICE_ID_HEADER);
                    message
                        .headers
                        .push((crate::device::DEVICE_ID_HEADER.to_owned(), id.to_string()));
                    registered_id.get_or_insert_with(|| id.to_string());
                }
                pipeline.worker_for(&id)
            }
            Err(missing) => {
                // Keyed by the topic: the message is still processed, in
                // the order of its topic, and the count shows how many
                // messages the key did not fit.
                stats::add(&pipeline.stats.device_key_missing, 1);
                tracing::debug!(pipeline = %pipeline.config.name, topic = %received.topic, device_key = %key, reason = %missing, "no device id; keyed by the topic");
                pipeline.worker_for(&received.topic)
            }
        };
        pending.push_back(Routed {
            pipeline: pipeline.clone(),
            worker,
            job: Job {
                message,
                ack: ack.clone(),
            },
        });
    }
    let device = registered_id
        .as_deref()
        .unwrap_or_else(|| crate::fleet::device_id(&received.topic));
    events.message_received(device, &received.topic);
}

/// Header that marks a message whose payload exceeds `mqtt.max_payload_bytes`.
pub const OVERSIZED_HEADER: &str = "eliot-oversized-limit";

/// Sends the acknowledgements the pipelines release, until every sender is
/// gone. `client` names the client of the source's current connection; a
/// restarted source task replaces it.
pub async fn run_acker(
    client: watch::Receiver<Client>,
    current_connection: Arc<std::sync::atomic::AtomicU64>,
    acks: &mut mpsc::UnboundedReceiver<(AckToken, u64)>,
) {
    while let Some((token, connection)) = acks.recv().await {
        if connection != current_connection.load(std::sync::atomic::Ordering::Acquire) {
            tracing::debug!(pkid = token.pkid(), "ack from an earlier connection skipped; the broker redelivers or forgot the message");
            continue;
        }
        #[cfg(feature = "fault-injection")]
        if token.topic().contains(FAULT_INJECTION_ACKER_TOPIC_LEVEL) && inject_once(&ACKER_FAULT) {
            panic!("fault injected in the acker for topic {}", token.topic());
        }
        let client = client.borrow().clone();
        if let Err(e) = client.ack(&token).await {
            tracing::warn!(pkid = token.pkid(), error = %e, "acknowledgement not sent; the broker will redeliver");
        }
    }
}

/// A topic level that makes the source task panic on the first message that
/// carries it, and only on the first: the broker delivers that message again
/// after the restart, and it must then pass. Compiled only with the
/// `fault-injection` feature, which only the test crate turns on.
#[cfg(feature = "fault-injection")]
pub const FAULT_INJECTION_SOURCE_TOPIC_LEVEL: &str = "eliot-fault-injection-source-once";

/// Like [`FAULT_INJECTION_SOURCE_TOPIC_LEVEL`], for the acker task.
#[cfg(feature = "fault-injection")]
pub const FAULT_INJECTION_ACKER_TOPIC_LEVEL: &str = "eliot-fault-injection-acker-once";

#[cfg(feature = "fault-injection")]
static SOURCE_FAULT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
#[cfg(feature = "fault-injection")]
static ACKER_FAULT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Returns `true` the first time it is called with `fired`.
#[cfg(feature = "fault-injection")]
fn inject_once(fired: &std::sync::atomic::AtomicBool) -> bool {
    !fired.swap(true, std::sync::atomic::Ordering::AcqRel)
}
