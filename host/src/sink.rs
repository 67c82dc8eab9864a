//! Sinks: where a pipeline's results go. A JSON-lines file and an MQTT
//! republish on a topic built from a template.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;

use crate::wasm::Message;

/// A topic built from placeholders, for the MQTT republish sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    parts: Vec<TemplatePart>,
    text: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TemplatePart {
    Literal(String),
    Pipeline,
    Topic,
    PayloadField(String),
    Header(String),
}

impl TopicTemplate {
    /// Parses a template such as `processed/{payload.device_id}`.
    ///
    /// # Errors
    ///
    /// Returns what is wrong: an unclosed brace, an unknown placeholder, or a
    /// wildcard, which a topic to publish on must not contain.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(TemplatePart::Literal(rest[..open].to_owned()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("unclosed \"{{\" in \"{text}\""))?
                + open;
            let name = &rest[open + 1..close];
            parts.push(match name {
                "pipeline" => TemplatePart::Pipeline,
                "topic" => TemplatePart::Topic,
                _ => {
                    if let Some(field) = name.strip_prefix("payload.").filter(|f| !f.is_empty()) {
                        TemplatePart::PayloadField(field.to_owned())
                    } else if let Some(header) =
                        name.strip_prefix("header.").filter(|h| !h.is_empty())
                    {
                        TemplatePart::Header(header.to_owned())
                    } else {
                        return Err(format!("unknown placeholder \"{{{name}}}\" in \"{text}\""));
                    }
                }
            });
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(TemplatePart::Literal(rest.to_owned()));
        }
        if text.contains(['+', '#']) {
            return Err(format!(
                "\"{text}\" contains a wildcard, which a publish topic must not"
            ));
        }
        if text.is_empty() {
            return Err("the topic template is empty".to_owned());
        }
        Ok(Self {
            parts,
            text: text.to_owned(),
        })
    }

    /// Builds the topic for `message` of `pipeline`.
    ///
    /// # Errors
    ///
    /// Returns why a placeholder has no value: a payload that is not a JSON
    /// object, a missing field or header, or a value that would change the
    /// topic's levels or add a wildcard.
    pub fn render(&self, pipeline: &str, message: &Message) -> Result<String, String> {
        let mut payload: Option<serde_json::Value> = None;
        let mut topic = String::new();
        for part in &self.parts {
            let value = match part {
                TemplatePart::Literal(text) => {
                    topic.push_str(text);
                    continue;
                }
                TemplatePart::Pipeline => pipeline.to_owned(),
                TemplatePart::Topic => {
                    topic.push_str(&message.topic);
                    continue;
                }
                TemplatePart::Header(name) => message
                    .headers
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.clone())
                    .ok_or_else(|| {
                        format!(
                            "topic template \"{}\": the message has no header \"{name}\"",
                            self.text
                        )
                    })?,
                TemplatePart::PayloadField(field) => {
                    let object = payload.get_or_insert_with(|| {
                        serde_json::from_slice(&message.payload).unwrap_or(serde_json::Value::Null)
                    });
                    match object.get(field) {
                        Some(serde_json::Value::String(s)) => s.clone(),
                        Some(serde_json::Value::Number(n)) => n.to_string(),
                        Some(_) => {
                            return Err(format!(
                                "topic template \"{}\": payload field \"{field}\" is not a string or number",
                                self.text
                            ))
                        }
                        None => {
                            return Err(format!(
                                "topic template \"{}\": the payload has no field \"{field}\"",
                                self.text
                            ))
                        }
                    }
                }
            };
            if value.is_empty() || value.contains(['/', '+', '#', '\0']) {
                return Err(format!(
                    "topic template \"{}\": value \"{value}\" is empty or contains '/', '+', '#' or NUL",
                    self.text
                ));
            }
            topic.push_str(&value);
        }
        Ok(topic)
    }
}

/// Checks whether the MQTT specification forbids `c` (U+0000) or
/// discourages it (control characters, non-characters) in a UTF-8 string
/// of a packet. A broker may close the connection of a client that sends
/// one, and Mosquitto does, so a publish with one would fail on every retry.
fn refused_by_brokers(c: char) -> bool {
    let code = u32::from(c);
    code <= 0x1f
        || (0x7f..=0x9f).contains(&code)
        || (0xfdd0..=0xfdef).contains(&code)
        || code & 0xfffe == 0xfffe
}

/// One output message with what produced it, as the sinks receive it.
pub struct Record<'a> {
    pub pipeline: &'a str,
    pub message: &'a Message,
    /// `stage@version` of every stage the message passed, in order.
    pub processed_by: &'a [String],
}

/// The fields of a file sink line before the payload.
#[derive(serde::Serialize)]
struct RecordHead<'a> {
    pipeline: &'a str,
    topic: &'a str,
    received_at: String,
    processed_by: &'a [String],
    headers: &'a [(String, String)],
}

/// Writes `record` as one line of JSON: the pipeline, the topic, the
/// receive time, the stage versions, the headers, and the payload last.
///
/// A payload that is valid JSON without line breaks is copied as it is:
/// parsing it into a tree and writing it again cost about a tenth of the
/// host's work per message (see tests/bench/BENCHMARKS.md). JSON spread
/// over several lines is written again on one line, so that every record
/// stays one line, and anything else goes under `payload_base64`.
pub fn write_record(out: &mut impl Write, record: &Record<'_>) -> std::io::Result<()> {
    let message = record.message;
    let head = RecordHead {
        pipeline: record.pipeline,
        topic: &message.topic,
        received_at: crate::clock::rfc3339_ms(message.received_at_ms),
        processed_by: record.processed_by,
        headers: &message.headers,
    };
    let mut line = serde_json::to_vec(&head)?;
    // The head is a JSON object: take off its `}` and go on with the payload.
    line.pop();
    let payload = message.payload.trim_ascii();
    // `IgnoredAny` checks the JSON syntax without building a tree, but not
    // the UTF-8 inside strings, so the bytes are checked first.
    let is_json = std::str::from_utf8(payload)
        .is_ok_and(|text| serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok());
    if is_json && !payload.iter().any(|b| matches!(b, b'\n' | b'\r')) {
        line.extend_from_slice(b",\"payload\":");
        line.extend_from_slice(payload);
    } else if is_json {
        let value: serde_json::Value = serde_json::from_slice(payload)?;
        line.extend_from_slice(b",\"payload\":");
        serde_json::to_writer(&mut line, &value)?;
    } else {
        line.extend_from_slice(b",\"payload_base64\":");
        let encoded = base64::engine::general_purpose::STANDARD.encode(&message.payload);
        serde_json::to_writer(&mut line, &encoded)?;
    }
    line.extend_from_slice(b"}\n");
    out.write_all(&line)
}

/// Appends JSON lines to a file through a buffer; [`FileSink::flush`]
/// makes a batch durable in the OS before its messages are acknowledged.
///
/// The file is opened again when it was moved or deleted (log rotation), and
/// a write fails while the path cannot be opened, for example when its
/// folder is gone: the pipeline then holds its messages until it can write.
pub struct FileSink {
    path: PathBuf,
    writer: Option<BufWriter<File>>,
    /// Whether the path was checked against the open file since the last
    /// flush; checking once per batch keeps two `stat` calls off every line.
    verified: bool,
}

impl FileSink {
    /// Opens `path` for appending, creating it and its folder.
    ///
    /// # Errors
    ///
    /// Returns the I/O error with the path.
    pub fn open(path: &Path) -> Result<Self, SinkError> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|source| SinkError::Io {
                path: path.to_owned(),
                source,
            })?;
        }
        let mut sink = Self {
            path: path.to_owned(),
            writer: None,
            verified: false,
        };
        sink.writer()?;
        Ok(sink)
    }

    /// The open writer, opening the file first when there is none or when
    /// the path no longer names the open file.
    fn writer(&mut self) -> Result<&mut BufWriter<File>, SinkError> {
        let io = |source| SinkError::Io {
            path: self.path.clone(),
            source,
        };
        let stale = match &self.writer {
            None => true,
            Some(_) if self.verified => false,
            Some(writer) => !same_file(writer.get_ref(), &self.path),
        };
        self.verified = true;
        if stale {
            if let Some(mut old) = self.writer.take() {
                // The data belongs to the moved file; losing it only means
                // the unacknowledged messages come back from the broker.
                let _ = old.flush();
            }
            let mut file = OpenOptions::new()
                .create(true)
                .append(true)
                .read(true)
                .open(&self.path)
                .map_err(io)?;
            end_with_newline(&mut file).map_err(io)?;
            self.writer = Some(BufWriter::with_capacity(256 * 1024, file));
        }
        Ok(self.writer.as_mut().expect("the writer was just opened"))
    }

    /// Appends `record` as one line; see [`write_record`].
    pub fn write_record(&mut self, record: &Record<'_>) -> Result<(), SinkError> {
        let path = self.path.clone();
        write_record(self.writer()?, record).map_err(|source| SinkError::Io { path, source })
    }

    pub fn flush(&mut self) -> Result<(), SinkError> {
        let path = self.path.clone();
        let result = self.writer()?.flush();
        self.verified = false;
        if result.is_err() {
            // Start over with a fresh handle on the next attempt.
            self.writer = None;
        }
        result.map_err(|source| SinkError::Io { path, source })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Tells whether `path` still names the open `file`.
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;

    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(open), Ok(named)) => open.dev() == named.dev() && open.ino() == named.ino(),
        _ => false,
    }
}

/// Appends a newline when the file ends inside a line, which a host killed
/// in the middle of a write leaves behind, so that the torn line stays one
/// line of its own and the next record starts cleanly.
fn end_with_newline(file: &mut File) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};

    let length = file.metadata()?.len();
    if length == 0 {
        return Ok(());
    }
    let mut last = [0u8; 1];
    file.seek(SeekFrom::Start(length - 1))?;
    file.read_exact(&mut last)?;
    if last[0] != b'\n' {
        file.write_all(b"\n")?;
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Publishes results on its own MQTT connection. A separate connection keeps
/// the republish path from waiting behind the subscription's event loop,
/// which stops reading while the pipeline is full.
///
/// Every publish stays in an [`Outbox`](crate::outbox::Outbox) until the
/// broker confirmed it, and [`MqttSink::publish`] returns a
/// [`Confirmation`] that resolves then; the pipeline acknowledges the input
/// only after that.
pub struct MqttSink {
    shared: Arc<Republish>,
    /// Largest packet the broker connection accepts; a bigger publish
    /// would fail the connection.
    max_packet_bytes: usize,
    pub topic: TopicTemplate,
}

/// Maximum number of unconfirmed publishes the sink keeps. A full window makes
/// [`MqttSink::publish`] wait, and so the pipeline stop reading.
const REPUBLISH_WINDOW: usize = 1000;

/// Resolves once the broker confirmed one publish, or with the reason the
/// sink gave it up. A receive error means that the sink's connection task
/// is gone, so the publish will never be confirmed.
pub type Confirmation = tokio::sync::oneshot::Receiver<Result<(), String>>;

/// Connections a publish may see lost while it is in flight before the sink
/// gives it up. A publish the broker rejects by closing the connection (one
/// over the broker's own size limit, or a topic its ACL forbids on MQTT 3.1.1)
/// would otherwise be sent again after every reconnect, for ever, and hold
/// up everything behind it.
const REPUBLISH_ATTEMPTS: u32 = 5;

/// A publish as the outbox keeps it, with whom to tell once it is confirmed.
struct Pending {
    topic: String,
    payload: Vec<u8>,
    /// Sent as MQTT 5 user properties; dropped on 3.1.1.
    headers: Vec<(String, String)>,
    /// Connections it was queued on.
    attempts: u32,
    confirm: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
}

/// State shared by the sink and its connection task.
struct Republish {
    state: std::sync::Mutex<RepublishState>,
    /// One permit per free place in the window.
    room: tokio::sync::Semaphore,
}

struct RepublishState {
    outbox: crate::outbox::Outbox<Pending>,
    /// The current connection's client, while it is up. Queueing under the
    /// lock keeps the channel in the order the outbox expects.
    client: Option<crate::mqtt::Client>,
    qos: rumqttc::QoS,
    retain: bool,
    closed: bool,
}

impl Republish {
    fn lock(&self) -> std::sync::MutexGuard<'_, RepublishState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl RepublishState {
    /// Queues one publish on the current connection. The channel has room
    /// for the whole window, so it is never full; a closed channel means
    /// the connection is being replaced, and the next one sends it again.
    fn queue(
        client: Option<&crate::mqtt::Client>,
        qos: rumqttc::QoS,
        retain: bool,
        pending: &mut Pending,
    ) {
        pending.attempts += 1;
        if let Some(client) = client {
            let _ = client.try_publish(
                &pending.topic,
                qos,
                retain,
                pending.payload.clone(),
                &pending.headers,
            );
        }
    }

    /// Tells the publisher of a confirmed publish, and frees its place.
    fn confirm(
        room: &tokio::sync::Semaphore,
        confirmed: Option<Pending>,
        result: Result<(), String>,
    ) {
        if let Some(mut pending) = confirmed {
            if let Some(confirm) = pending.confirm.take() {
                // The publisher may have stopped waiting (shutdown).
                let _ = confirm.send(result);
            }
            room.add_permits(1);
        }
    }
}

impl MqttSink {
    /// Connects to `endpoint` with client id `client_id` and drives the
    /// connection in a background task until the sink is dropped.
    pub fn connect(
        endpoint: crate::mqtt::Endpoint,
        client_id: String,
        topic: TopicTemplate,
        qos: rumqttc::QoS,
        retain: bool,
        max_packet_bytes: usize,
    ) -> Self {
        let shared = Arc::new(Republish {
            state: std::sync::Mutex::new(RepublishState {
                outbox: crate::outbox::Outbox::new(qos == rumqttc::QoS::AtMostOnce),
                client: None,
                qos,
                retain,
                closed: false,
            }),
            room: tokio::sync::Semaphore::new(REPUBLISH_WINDOW),
        });
        tokio::spawn(drive_republish(
            endpoint,
            client_id,
            max_packet_bytes,
            shared.clone(),
        ));
        Self {
            shared,
            max_packet_bytes,
            topic,
        }
    }

    /// Checks that a publish of `payload` on `topic` fits MQTT and the
    /// packet limit, so that one oversized output is dead-lettered instead
    /// of failing the connection and the messages queued behind it.
    ///
    /// # Errors
    ///
    /// Returns why the publish cannot be sent.
    pub fn check_size(
        &self,
        topic: &str,
        payload: &[u8],
        headers: &[(String, String)],
    ) -> Result<(), String> {
        if topic.is_empty() || topic.contains(['+', '#']) {
            return Err(format!(
                "republish topic \"{topic}\" is empty or contains a wildcard (+ or #), which MQTT allows only in filters; check the sink's topic template and the fields it takes"
            ));
        }
        if topic.len() > usize::from(u16::MAX) {
            return Err(format!(
                "republish topic of {} bytes exceeds MQTT's 65535 bytes",
                topic.len()
            ));
        }
        let texts =
            std::iter::once(("topic", topic)).chain(headers.iter().flat_map(|(name, value)| {
                [
                    ("header name", name.as_str()),
                    ("header value", value.as_str()),
                ]
            }));
        for (what, text) in texts {
            if let Some(refused) = text.chars().find(|c| refused_by_brokers(*c)) {
                return Err(format!(
                    "republish {what} {text:?} contains the character {refused:?}, which MQTT brokers refuse \
                     (Mosquitto closes the connection); check the sink's topic template and the fields and \
                     headers it takes"
                ));
            }
        }
        // Fixed header (at most 5 bytes), topic length prefix, packet id,
        // and on MQTT 5 the property length (at most 4 bytes) and one
        // identifier byte and two length-prefixed strings per header. The
        // estimate counts the properties on 3.1.1 too, which is at most
        // their size too strict.
        let properties: usize = headers
            .iter()
            .map(|(name, value)| 1 + 2 + name.len() + 2 + value.len())
            .sum();
        let packet = 5 + 2 + topic.len() + 2 + 4 + properties + payload.len();
        if packet > self.max_packet_bytes {
            return Err(format!(
                "republished packet of {packet} bytes exceeds mqtt.max_packet_bytes ({} bytes)",
                self.max_packet_bytes
            ));
        }
        Ok(())
    }

    /// Adds one publish to the outbox and returns what resolves once the
    /// broker confirmed it. Waits while the window of unconfirmed publishes
    /// is full.
    pub async fn publish(
        &self,
        topic: String,
        payload: Vec<u8>,
        headers: Vec<(String, String)>,
    ) -> Confirmation {
        let (confirm, confirmation) = tokio::sync::oneshot::channel();
        // The semaphore is never closed, so acquiring only waits.
        if let Ok(permit) = self.shared.room.acquire().await {
            // Given back when the publish is confirmed.
            permit.forget();
        }
        let mut state = self.shared.lock();
        let (_, queue_now) = state.outbox.push(Pending {
            topic,
            payload,
            headers,
            attempts: 0,
            confirm: Some(confirm),
        });
        if queue_now {
            let state = &mut *state;
            if let Some(pending) = state.outbox.iter_mut().last() {
                RepublishState::queue(state.client.as_ref(), state.qos, state.retain, pending);
            }
        }
        confirmation
    }
}

impl Drop for MqttSink {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.closed = true;
        if let Some(client) = &state.client {
            let _ = client.try_disconnect();
        }
    }
}

/// Drives the sink's connection: a new rumqttc event loop for every
/// connection, so that what was queued on a lost one is dropped with it and
/// sent again from the outbox, exactly once per connection.
async fn drive_republish(
    endpoint: crate::mqtt::Endpoint,
    client_id: String,
    max_packet_bytes: usize,
    shared: Arc<Republish>,
) {
    let mut backoff = crate::source::ReconnectBackoff::new();
    let session = crate::mqtt::Session {
        client_id: &client_id,
        persistent: false,
        manual_acks: false,
        max_incoming_bytes: max_packet_bytes,
        max_outgoing_bytes: max_packet_bytes,
        capacity: REPUBLISH_WINDOW + 1,
        receive_maximum: None,
    };
    loop {
        let (client, mut eventloop) = crate::mqtt::connect(&endpoint, &session);
        loop {
            let event = eventloop.poll().await;
            match on_republish_event(&shared, &client, &client_id, event) {
                Step::Next => {}
                Step::Stop => return,
                Step::Reconnect { error, unconfirmed } => {
                    let delay = backoff.next_delay();
                    tracing::warn!(
                        client_id,
                        error,
                        unconfirmed,
                        retry_in_ms = delay.as_millis() as u64,
                        "republish connection lost; unconfirmed publishes are sent again after reconnecting"
                    );
                    tokio::time::sleep(delay).await;
                    // A new event loop: the old one's channel and packet ids
                    // are dropped with it.
                    break;
                }
                Step::Connected => backoff.reset(),
            }
        }
    }
}

/// Next step of the republish connection task after one event.
enum Step {
    Next,
    Connected,
    Reconnect { error: String, unconfirmed: usize },
    Stop,
}

/// Applies one event of the republish connection to the outbox.
fn on_republish_event(
    shared: &Republish,
    client: &crate::mqtt::Client,
    client_id: &str,
    event: Result<crate::mqtt::Event, crate::mqtt::ConnectionError>,
) -> Step {
    use crate::mqtt::Event;

    let mut guard = shared.lock();
    let state = &mut *guard;
    match event {
        Ok(Event::ConnAck { .. }) => {
            if state.closed {
                let _ = client.try_disconnect();
                return Step::Connected;
            }
            state.client = Some(client.clone());
            let again = state.outbox.connected();
            if again > 0 {
                tracing::info!(
                    client_id,
                    publishes = again,
                    "republish connection up; sending the unconfirmed publishes"
                );
            }
            for pending in state.outbox.iter_mut() {
                RepublishState::queue(Some(client), state.qos, state.retain, pending);
            }
            Step::Connected
        }
        Ok(Event::PublishWritten { pkid }) => {
            let confirmed = state.outbox.written(pkid);
            RepublishState::confirm(&shared.room, confirmed, Ok(()));
            Step::Next
        }
        Ok(Event::AwaitAck { pkid }) => {
            state.outbox.held_back(pkid);
            Step::Next
        }
        Ok(Event::Acknowledged { pkid, refused }) => {
            let confirmed = state.outbox.acknowledged(pkid);
            let result = match (&confirmed, refused) {
                (Some(pending), Some(reason)) => {
                    let reason = format!(
                        "the broker refused the republish to \"{}\" with reason {reason}; allow this client to publish there in the broker's ACL, or change the sink's topic",
                        pending.topic
                    );
                    tracing::error!(client_id, topic = %pending.topic, reason, "republish refused");
                    Err(reason)
                }
                _ => Ok(()),
            };
            RepublishState::confirm(&shared.room, confirmed, result);
            Step::Next
        }
        Ok(Event::DisconnectSent) => {
            state.client = None;
            Step::Stop
        }
        Ok(_) => Step::Next,
        Err(e) => {
            state.client = None;
            state.outbox.disconnected();
            if state.closed {
                return Step::Stop;
            }
            let given_up = state
                .outbox
                .take_if(|pending| pending.attempts >= REPUBLISH_ATTEMPTS);
            for pending in given_up {
                let reason = format!(
                    "the republish connection was lost {REPUBLISH_ATTEMPTS} times while this publish to \"{}\" was in flight; the broker may refuse it (its message size limit or ACL)",
                    pending.topic
                );
                tracing::error!(client_id, topic = %pending.topic, reason, "republish given up");
                RepublishState::confirm(&shared.room, Some(pending), Err(reason));
            }
            Step::Reconnect {
                error: e.to_string(),
                unconfirmed: state.outbox.len(),
            }
        }
    }
}

/// One configured sink: where it writes and its circuit breaker.
pub struct Sink {
    pub name: String,
    pub target: SinkTarget,
    /// Shared by every pipeline that writes to this sink; locked only to
    /// ask for a permit or record a result.
    pub breaker: std::sync::Mutex<crate::breaker::CircuitBreaker>,
}

/// The kinds of sink target.
pub enum SinkTarget {
    File(std::sync::Mutex<FileSink>),
    Mqtt(MqttSink),
}

impl Sink {
    pub fn new(
        name: String,
        target: SinkTarget,
        breaker: &crate::config::SinkBreakerConfig,
    ) -> Self {
        let breaker = crate::breaker::CircuitBreaker::new(
            breaker.failure_threshold,
            Duration::from_millis(breaker.cool_down_ms),
        );
        Self {
            name,
            target,
            breaker: std::sync::Mutex::new(breaker),
        }
    }

    pub fn breaker_state(&self) -> crate::breaker::BreakerState {
        self.breaker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .state()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wasm::Qos;

    fn line_for(payload: &[u8]) -> String {
        let message = Message {
            topic: "devices/robot_001/telemetry".to_owned(),
            payload: payload.to_vec(),
            qos: Qos::AtLeastOnce,
            retain: false,
            received_at_ms: 1_749_133_800_000,
            headers: vec![("device_id".to_owned(), "robot_001".to_owned())],
        };
        let processed_by = ["enrich@0.1.0".to_owned()];
        let record = Record {
            pipeline: "telemetry",
            message: &message,
            processed_by: &processed_by,
        };
        let mut out = Vec::new();
        write_record(&mut out, &record).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn record_copies_one_line_json_payload() {
        let line = line_for(br#"{"device_id": "robot_001", "data": {"t": 1.50}}"#);
        assert_eq!(
            line,
            concat!(
                r#"{"pipeline":"telemetry","topic":"devices/robot_001/telemetry","#,
                r#""received_at":"2025-06-05T14:30:00Z","processed_by":["enrich@0.1.0"],"#,
                r#""headers":[["device_id","robot_001"]],"#,
                r#""payload":{"device_id": "robot_001", "data": {"t": 1.50}}}"#,
                "\n"
            )
        );
    }

    #[test]
    fn record_puts_multi_line_json_on_one_line() {
        let line = line_for(b"{\n  \"a\": [1,\r\n 2]\n}\n");
        assert!(line.ends_with("\"payload\":{\"a\":[1,2]}}\n"), "{line}");
        assert_eq!(line.matches('\n').count(), 1, "{line}");
    }

    #[test]
    fn record_trims_whitespace_around_json() {
        let line = line_for(b"  [1, 2]\t ");
        assert!(line.ends_with("\"payload\":[1, 2]}\n"), "{line}");
    }

    #[test]
    fn record_encodes_other_payloads_as_base64() {
        for (payload, encoded) in [
            (&b"not json"[..], "bm90IGpzb24="),
            (b"{\"a\": 1} trailing", "eyJhIjogMX0gdHJhaWxpbmc="),
            (b"", ""),
        ] {
            let line = line_for(payload);
            let record: serde_json::Value = serde_json::from_str(&line).unwrap();
            assert_eq!(record["payload_base64"], encoded, "{line}");
            assert!(record.get("payload").is_none(), "{line}");
        }
    }

    #[test]
    fn record_encodes_json_with_invalid_utf8_as_base64() {
        let line = line_for(b"{\"a\": \"\xff\"}");
        let record: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(record["payload_base64"], "eyJhIjogIv8ifQ==", "{line}");
    }

    #[test]
    fn record_lines_parse_as_json() {
        let line = line_for(br#"{"s": "a\nb"}"#);
        let record: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(record["payload"]["s"], "a\nb");
        assert_eq!(record["processed_by"][0], "enrich@0.1.0");
    }
}
