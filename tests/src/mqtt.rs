//! MQTT 3.1.1 clients for tests, built on rumqttc: a publisher that returns
//! once the broker has acknowledged every message, and a subscriber that
//! collects messages in the background.
//!
//! Both connect to 127.0.0.1 and run their own single-threaded Tokio runtime
//! on a separate thread, so they work from plain `#[test]` functions and
//! from inside `#[tokio::test]` alike. They block the calling thread.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, SubscribeReasonCode};
use serde_json::Value;
use tokio::sync::oneshot;

pub use rumqttc::QoS;

/// Time limit of [`publish_all`]. Publishing all 21,981 bundled sensor
/// messages at QoS 1 took about 0.3 s in the `round_trip_of_all_sensor_data`
/// test on a 2-core machine, so the limit leaves a wide margin.
pub const DEFAULT_PUBLISH_TIMEOUT: Duration = Duration::from_secs(120);

/// Time limit for a [`Subscriber`] to connect and subscribe.
pub const DEFAULT_SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Maximum MQTT packet size the clients send and accept, well above
/// rumqttc's default of 10 KiB, so that tests can send oversized payloads.
const MAX_PACKET_SIZE: usize = 64 * 1024 * 1024;

/// Capacity of rumqttc's request channel between a client and its event loop.
const REQUEST_CHANNEL_CAPACITY: usize = 100;

const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const RECONNECT_DELAY: Duration = Duration::from_millis(50);

/// A message that a [`Subscriber`] received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedMessage {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: QoS,
    pub retain: bool,
    /// Set when the broker redelivers a QoS 1 or 2 message.
    pub dup: bool,
}

impl ReceivedMessage {
    /// Parses the payload as JSON.
    ///
    /// # Panics
    ///
    /// Panics with the topic and payload when the payload is not valid JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.payload).unwrap_or_else(|err| {
            panic!(
                "message on {} has an invalid JSON payload: {err}: {}",
                self.topic,
                String::from_utf8_lossy(&self.payload)
            )
        })
    }

    /// Returns the payload as text, with invalid UTF-8 replaced.
    pub fn payload_str(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

/// Publishes `messages` as `(topic, payload)` pairs in order, with one
/// connection and without the retain flag. Returns once the broker has
/// acknowledged every message: PUBACK for QoS 1, PUBCOMP for QoS 2. QoS 0
/// has no acknowledgement, so for it the call returns once every message is
/// written and the connection is closed with DISCONNECT, which the broker
/// reads after the messages.
///
/// NOTE: Mosquitto 2.0.11 (Debian 12) stops forwarding messages published
/// with QoS 2 once a subscriber has `max_inflight_messages` of them in
/// flight. Start the broker with
/// [`max_inflight_messages(0)`](crate::MosquittoBuilder::max_inflight_messages)
/// to publish more than 20 of them to a subscriber.
///
/// # Panics
///
/// Panics when the connection fails, or when [`DEFAULT_PUBLISH_TIMEOUT`]
/// passes first. The panic message contains the number of acknowledged
/// messages.
pub fn publish_all<T, P>(port: u16, messages: &[(T, P)], qos: QoS)
where
    T: AsRef<str> + Sync,
    P: AsRef<[u8]> + Sync,
{
    publish_all_with_timeout(port, messages, qos, DEFAULT_PUBLISH_TIMEOUT);
}

/// Does the same as [`publish_all`] with a time limit of `timeout`.
pub fn publish_all_with_timeout<T, P>(port: u16, messages: &[(T, P)], qos: QoS, timeout: Duration)
where
    T: AsRef<str> + Sync,
    P: AsRef<[u8]> + Sync,
{
    if messages.is_empty() {
        return;
    }

    let result = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime = new_runtime();
                runtime.block_on(async {
                    let publishing = publish_and_await_acks(port, messages, qos);
                    match tokio::time::timeout(timeout, publishing).await {
                        Ok(result) => result,
                        Err(_) => Err(format!("timed out after {timeout:?}")),
                    }
                })
            })
            .join()
            .expect("the publisher thread does not panic")
    });

    if let Err(err) = result {
        panic!(
            "failed to publish {} messages with {qos:?} to 127.0.0.1:{port}: {err}",
            messages.len()
        );
    }
}

async fn publish_and_await_acks<T, P>(
    port: u16,
    messages: &[(T, P)],
    qos: QoS,
) -> Result<(), String>
where
    T: AsRef<str>,
    P: AsRef<[u8]>,
{
    let options = mqtt_options(port, &new_client_id("publisher"), true);
    let (client, mut eventloop) = AsyncClient::new(options, REQUEST_CHANNEL_CAPACITY);
    let total = messages.len();

    let send = async {
        for (topic, payload) in messages {
            client
                .publish(topic.as_ref(), qos, false, payload.as_ref().to_vec())
                .await
                .map_err(|err| format!("rumqttc rejected a publish request: {err}"))?;
        }
        Ok::<(), String>(())
    };

    let drive = async {
        let mut acknowledged = 0;
        while acknowledged < total {
            let event = eventloop.poll().await.map_err(|err| {
                format!("connection failed after {acknowledged} of {total} acknowledgements: {err}")
            })?;
            let completes_message = matches!(
                (qos, &event),
                (QoS::AtMostOnce, Event::Outgoing(Outgoing::Publish(_)))
                    | (QoS::AtLeastOnce, Event::Incoming(Packet::PubAck(_)))
                    | (QoS::ExactlyOnce, Event::Incoming(Packet::PubComp(_)))
            );
            if completes_message {
                acknowledged += 1;
            }
        }
        Ok(())
    };

    tokio::try_join!(send, drive)?;
    disconnect(&client, &mut eventloop).await
}

/// Options of a [`Subscriber`]. Create one with [`Subscriber::builder`].
#[derive(Debug, Clone)]
pub struct SubscriberBuilder {
    port: u16,
    filter: String,
    qos: QoS,
    client_id: Option<String>,
    clean_session: bool,
    reconnect: bool,
    subscribe_timeout: Duration,
}

impl SubscriberBuilder {
    /// Sets the subscription's maximum QoS. Defaults to QoS 1.
    pub fn qos(mut self, qos: QoS) -> Self {
        self.qos = qos;
        self
    }

    /// Sets the client id. Defaults to a new id that is unique on this
    /// machine. A persistent session needs a fixed id to be resumed.
    pub fn client_id(mut self, client_id: impl Into<String>) -> Self {
        self.client_id = Some(client_id.into());
        self
    }

    /// With `false`, the broker keeps the session after a disconnect and
    /// queues QoS 1 and 2 messages for it until a client with the same id
    /// connects again. Defaults to `true`.
    pub fn clean_session(mut self, clean_session: bool) -> Self {
        self.clean_session = clean_session;
        self
    }

    /// With `true`, the subscriber reconnects every 50 ms after it loses
    /// its connection, for example while a test restarts the broker, and
    /// subscribes again. Messages published while it is disconnected are
    /// lost unless the session is persistent. Defaults to `false`: the first
    /// lost connection ends the subscriber.
    pub fn reconnect(mut self, reconnect: bool) -> Self {
        self.reconnect = reconnect;
        self
    }

    /// Sets how long connecting and subscribing may take. Defaults to
    /// [`DEFAULT_SUBSCRIBE_TIMEOUT`].
    pub fn subscribe_timeout(mut self, timeout: Duration) -> Self {
        self.subscribe_timeout = timeout;
        self
    }

    /// Connects, subscribes and returns once the broker has acknowledged
    /// the subscription, so that every message published afterwards is
    /// received.
    ///
    /// # Panics
    ///
    /// Panics when the connection fails, when the broker rejects the
    /// subscription, or when the subscribe timeout passes first.
    pub fn connect(self) -> Subscriber {
        let client_id = self
            .client_id
            .clone()
            .unwrap_or_else(|| new_client_id("subscriber"));
        let options = mqtt_options(self.port, &client_id, self.clean_session);
        let (ready_tx, ready_rx) = mpsc::channel();
        let (messages_tx, messages_rx) = mpsc::channel();
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let connection_error = Arc::new(Mutex::new(None));

        let task = SubscriberTask {
            filter: self.filter.clone(),
            qos: self.qos,
            client_id: client_id.clone(),
            reconnect: self.reconnect,
            ready: Some(ready_tx),
            messages: messages_tx,
            connection_error: Arc::clone(&connection_error),
        };
        let thread = std::thread::Builder::new()
            .name(format!("mqtt-{client_id}"))
            .spawn(move || new_runtime().block_on(task.run(options, shutdown_rx)))
            .expect("failed to spawn the subscriber thread");

        let mut subscriber = Subscriber {
            filter: self.filter,
            client_id,
            messages: messages_rx,
            connection_error,
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
        };

        let ready = ready_rx.recv_timeout(self.subscribe_timeout);
        let failure = match ready {
            Ok(Ok(())) => return subscriber,
            Ok(Err(err)) => err,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                format!("timed out after {:?}", self.subscribe_timeout)
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => "the subscriber thread ended".to_owned(),
        };
        subscriber.shut_down();
        panic!(
            "client {} failed to subscribe to {} on 127.0.0.1:{}: {failure}",
            subscriber.client_id, subscriber.filter, self.port
        );
    }
}

/// An MQTT client subscribed to one topic filter. A background thread
/// receives messages into a queue until the subscriber is dropped, which
/// disconnects it.
pub struct Subscriber {
    filter: String,
    client_id: String,
    messages: mpsc::Receiver<ReceivedMessage>,
    connection_error: Arc<Mutex<Option<String>>>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Subscriber {
    /// Connects with a clean session and subscribes to `filter`. See
    /// [`SubscriberBuilder::connect`].
    pub fn connect(port: u16, filter: &str, qos: QoS) -> Subscriber {
        Subscriber::builder(port, filter).qos(qos).connect()
    }

    /// Returns the default options for a subscription to `filter`: QoS 1, a
    /// clean session, a unique client id and no reconnection.
    pub fn builder(port: u16, filter: &str) -> SubscriberBuilder {
        SubscriberBuilder {
            port,
            filter: filter.to_owned(),
            qos: QoS::AtLeastOnce,
            client_id: None,
            clean_session: true,
            reconnect: false,
            subscribe_timeout: DEFAULT_SUBSCRIBE_TIMEOUT,
        }
    }

    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    pub fn filter(&self) -> &str {
        &self.filter
    }

    /// Waits for the next `n` messages, in arrival order, and removes them
    /// from the queue. Later messages stay queued.
    ///
    /// # Panics
    ///
    /// Panics when `timeout` passes first or the connection is lost for
    /// good, with the number of messages received.
    pub fn collect(&self, n: usize, timeout: Duration) -> Vec<ReceivedMessage> {
        let mut received = Vec::with_capacity(n);
        let deadline = Instant::now() + timeout;
        while received.len() < n {
            match self.recv_until(deadline) {
                Ok(message) => received.push(message),
                Err(failure) => panic!(
                    "{failure} while waiting for {n} messages on {}: received {}",
                    self.filter,
                    received.len()
                ),
            }
        }
        received
    }

    /// Waits for messages until one matches `is_last`, and returns them all,
    /// the matching one last. Useful to wait for a marker message that a test
    /// publishes after the messages it counts.
    ///
    /// # Panics
    ///
    /// Panics when `timeout` passes first or the connection is lost for
    /// good, with the number of messages received.
    pub fn collect_until(
        &self,
        timeout: Duration,
        mut is_last: impl FnMut(&ReceivedMessage) -> bool,
    ) -> Vec<ReceivedMessage> {
        let mut received = Vec::new();
        let deadline = Instant::now() + timeout;
        loop {
            match self.recv_until(deadline) {
                Ok(message) => {
                    let last = is_last(&message);
                    received.push(message);
                    if last {
                        return received;
                    }
                }
                Err(failure) => panic!(
                    "{failure} while waiting for the last message on {}: received {} others",
                    self.filter,
                    received.len()
                ),
            }
        }
    }

    /// Removes and returns the messages queued so far, without waiting.
    pub fn drain(&self) -> Vec<ReceivedMessage> {
        self.messages.try_iter().collect()
    }

    /// Disconnects with DISCONNECT. With a persistent session the broker
    /// queues later messages for the client id. Dropping does the same.
    pub fn disconnect(mut self) {
        self.shut_down();
    }

    fn recv_until(&self, deadline: Instant) -> Result<ReceivedMessage, String> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        self.messages
            .recv_timeout(remaining)
            .map_err(|err| match err {
                mpsc::RecvTimeoutError::Timeout => "timed out".to_owned(),
                mpsc::RecvTimeoutError::Disconnected => {
                    let error = self
                        .connection_error
                        .lock()
                        .expect("lock is not poisoned")
                        .clone();
                    format!(
                        "client {} lost its connection ({})",
                        self.client_id,
                        error.unwrap_or_else(|| "no error recorded".to_owned())
                    )
                }
            })
    }

    fn shut_down(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            // An error means the thread has already ended.
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            // The thread's own panics would only repeat an error that
            // connect() or recv_until() reports.
            let _ = thread.join();
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.shut_down();
    }
}

impl std::fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscriber")
            .field("client_id", &self.client_id)
            .field("filter", &self.filter)
            .finish_non_exhaustive()
    }
}

/// State of the subscriber's background thread.
struct SubscriberTask {
    filter: String,
    qos: QoS,
    client_id: String,
    reconnect: bool,
    /// Receives the outcome of the first subscription, then becomes `None`.
    ready: Option<mpsc::Sender<Result<(), String>>>,
    messages: mpsc::Sender<ReceivedMessage>,
    connection_error: Arc<Mutex<Option<String>>>,
}

impl SubscriberTask {
    async fn run(mut self, options: MqttOptions, mut shutdown: oneshot::Receiver<()>) {
        let (client, mut eventloop) = AsyncClient::new(options, REQUEST_CHANNEL_CAPACITY);
        let mut connected = false;
        loop {
            let event = tokio::select! {
                event = eventloop.poll() => event,
                _ = &mut shutdown => {
                    if connected {
                        let _ = disconnect(&client, &mut eventloop).await;
                    }
                    return;
                }
            };

            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    connected = true;
                    // Subscribing again on a resumed session is harmless,
                    // and a clean session has lost its subscription.
                    if let Err(err) = client.subscribe(self.filter.as_str(), self.qos).await {
                        self.fail(format!("rumqttc rejected the subscribe request: {err}"));
                        return;
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if ack.return_codes.contains(&SubscribeReasonCode::Failure) {
                        self.fail("the broker rejected the subscription".to_owned());
                        return;
                    }
                    if let Some(ready) = self.ready.take() {
                        let _ = ready.send(Ok(()));
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    let message = ReceivedMessage {
                        topic: publish.topic,
                        payload: publish.payload.to_vec(),
                        qos: publish.qos,
                        retain: publish.retain,
                        dup: publish.dup,
                    };
                    // An error means the Subscriber is being dropped.
                    let _ = self.messages.send(message);
                }
                Ok(_) => {}
                Err(err) => {
                    let can_retry = self.reconnect && self.ready.is_none();
                    if !can_retry {
                        self.fail(err.to_string());
                        return;
                    }
                    if connected {
                        eprintln!(
                            "subscriber {}: connection lost ({err}); reconnecting",
                            self.client_id
                        );
                        connected = false;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(RECONNECT_DELAY) => {}
                        _ = &mut shutdown => return,
                    }
                }
            }
        }
    }

    /// Reports an error to `connect()` before the first subscription, or
    /// records it for `collect()` after it. Dropping `self` afterwards closes
    /// the message queue.
    fn fail(&mut self, error: String) {
        *self.connection_error.lock().expect("lock is not poisoned") = Some(error.clone());
        if let Some(ready) = self.ready.take() {
            let _ = ready.send(Err(error));
        }
    }
}

/// Sends DISCONNECT and waits until it is written.
async fn disconnect(client: &AsyncClient, eventloop: &mut EventLoop) -> Result<(), String> {
    client
        .disconnect()
        .await
        .map_err(|err| format!("rumqttc rejected the disconnect request: {err}"))?;
    let wait = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(Outgoing::Disconnect)) => return Ok(()),
                Ok(_) => {}
                Err(err) => return Err(format!("connection failed while disconnecting: {err}")),
            }
        }
    };
    tokio::time::timeout(DISCONNECT_TIMEOUT, wait)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "DISCONNECT was not written within {DISCONNECT_TIMEOUT:?}"
            ))
        })
}

fn mqtt_options(port: u16, client_id: &str, clean_session: bool) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options
        .set_clean_session(clean_session)
        .set_max_packet_size(MAX_PACKET_SIZE, MAX_PACKET_SIZE)
        .set_keep_alive(Duration::from_secs(30));
    options
}

/// Returns a client id that is unique among the processes of this machine:
/// an MQTT broker disconnects an older client when a new one reuses its id.
fn new_client_id(role: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let sequence = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("eliot-tests-{role}-{}-{sequence}", std::process::id())
}

fn new_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("failed to build a Tokio runtime")
}
