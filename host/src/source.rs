//! The MQTT source: one connection that subscribes to every pipeline's
//! filters, routes each message to the pipelines whose filters match, and
//! acknowledges it once they are all done.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tokio::sync::{mpsc, watch};

use crate::pipeline::{AckHandle, AckQueue, Job, Pipeline};
use crate::wasm::{Message, Qos};

/// Reconnect delays: exponential from 100 ms to 10 s, with jitter so that a
/// fleet of hosts does not reconnect in lockstep after a broker restart.
pub struct ReconnectBackoff {
    delays: backon::ExponentialBackoff,
}

impl ReconnectBackoff {
    pub fn new() -> Self {
        Self { delays: Self::builder().build() }
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
pub struct SourceOptions {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub keep_alive: Duration,
    pub max_packet_bytes: usize,
}

/// Connects and returns the client and its event loop. Acknowledgements are
/// manual: the host sends PUBACK only after the sinks took a message.
pub fn connect(options: &SourceOptions) -> (AsyncClient, EventLoop) {
    let mut mqtt = MqttOptions::new(options.client_id.clone(), options.host.clone(), options.port);
    mqtt.set_keep_alive(options.keep_alive);
    mqtt.set_max_packet_size(options.max_packet_bytes, options.max_packet_bytes);
    mqtt.set_clean_session(false);
    mqtt.set_manual_acks(true);
    AsyncClient::new(mqtt, 1024)
}

/// Reads messages until `shutdown` turns true, then drains: it stops
/// routing, releases the pipelines so that they finish what they hold, keeps
/// the connection polled until `acker` has queued the last acknowledgement,
/// and disconnects. Messages that arrive while draining are left
/// unacknowledged, so the broker delivers them again to the next session.
///
/// Reconnects with backoff after a connection error and subscribes again
/// whenever the broker reports that it kept no session.
pub async fn run(
    client: AsyncClient,
    mut eventloop: EventLoop,
    pipelines: Arc<Vec<Pipeline>>,
    acks: mpsc::UnboundedSender<rumqttc::Publish>,
    mut shutdown: watch::Receiver<bool>,
    connected: watch::Sender<bool>,
    acker: tokio::task::JoinHandle<()>,
) {
    let ack_queue = AckQueue::new(acks);
    let mut backoff = ReconnectBackoff::new();
    loop {
        let event = tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => break,
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::Publish(publish))) => route(&pipelines, publish, &ack_queue).await,
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                backoff.reset();
                tracing::info!(session_present = ack.session_present, "connected to the broker");
                if !ack.session_present {
                    subscribe(&client, &pipelines).await;
                }
                connected.send_replace(true);
            }
            Ok(_) => {}
            Err(e) => {
                connected.send_replace(false);
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "broker connection failed");
                tokio::select! {
                    _ = shutdown.wait_for(|stop| *stop) => break,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }

    // Draining. Dropping the last handles of the pipelines and of the ack
    // channel lets the workers, the sink tasks and then the acker finish.
    drop(pipelines);
    drop(ack_queue);
    let mut acker = acker;
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

async fn subscribe(client: &AsyncClient, pipelines: &[Pipeline]) {
    for pipeline in pipelines {
        for filter in &pipeline.config.topics {
            // The request only fails once the event loop is gone, and then
            // the next ConnAck subscribes again.
            if let Err(e) = client.subscribe(filter.as_str(), pipeline.config.qos).await {
                tracing::error!(pipeline = %pipeline.config.name, filter = %filter, error = %e, "subscribe request failed");
            }
        }
    }
}

/// Routes one message to every pipeline with a matching filter.
async fn route(pipelines: &[Pipeline], publish: rumqttc::Publish, acks: &Arc<AckQueue>) {
    let matching: Vec<&Pipeline> =
        pipelines.iter().filter(|p| p.config.topics.iter().any(|f| f.matches(&publish.topic))).collect();
    let ack = AckHandle::new(publish.clone(), matching.len().max(1), acks);
    if matching.is_empty() {
        // Can happen with overlapping subscriptions kept from an older
        // configuration in a persistent session.
        tracing::debug!(topic = %publish.topic, "no pipeline matches; acknowledged and ignored");
        ack.finish();
        return;
    }

    let message = Message {
        topic: publish.topic.clone(),
        payload: publish.payload.to_vec(),
        qos: match publish.qos {
            QoS::AtMostOnce => Qos::AtMostOnce,
            QoS::AtLeastOnce => Qos::AtLeastOnce,
            QoS::ExactlyOnce => Qos::ExactlyOnce,
        },
        retain: publish.retain,
        received_at_ms: crate::clock::now_ms(),
        headers: Vec::new(),
    };
    // NOTE: the device key is the topic, which is one device per topic in the
    // usual devices/{id}/... layout; keys taken from the payload are not
    // supported yet.
    for pipeline in matching {
        pipeline.dispatch(&publish.topic, Job { message: message.clone(), ack: ack.clone() }).await;
    }
}

/// Sends the acknowledgements the pipelines release, until every sender is
/// gone.
pub async fn run_acker(client: AsyncClient, mut acks: mpsc::UnboundedReceiver<rumqttc::Publish>) {
    while let Some(publish) = acks.recv().await {
        if let Err(e) = client.ack(&publish).await {
            tracing::warn!(topic = %publish.topic, pkid = publish.pkid, error = %e, "acknowledgement not sent; the broker will redeliver");
        }
    }
}
