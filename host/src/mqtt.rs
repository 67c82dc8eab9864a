//! One small interface over rumqttc's MQTT 3.1.1 client and its separate
//! MQTT 5 client, so that the source and the republish sink are written
//! once. Only what they use is here: connect, subscribe, manual acks,
//! publish with headers, and the events that drive the outbox.
//!
//! MQTT 5 user properties become message headers on the way in and go back
//! out as user properties on republish. The content type travels as the
//! header [`CONTENT_TYPE_HEADER`], so that plugins and topic templates see it
//! like any other header. MQTT 3.1.1 has no properties: headers are not
//! sent there.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5;

use crate::config::{MqttConfig, Protocol, Secret, TlsConfig};

/// Header that carries an MQTT 5 message's content type. The republish sink
/// sends it as the Content Type property, not as a user property.
pub const CONTENT_TYPE_HEADER: &str = "mqtt-content-type";

/// Largest packet MQTT can encode: a remaining length of 268,435,455 bytes
/// and a fixed header of at most 5.
pub const MQTT_MAX_PACKET: usize = 268_435_455 + 5;

/// QoS as both protocol versions know it.
pub use rumqttc::QoS;

/// How to reach and log in to the broker, shared by every connection of
/// one host.
#[derive(Clone)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub protocol: Protocol,
    pub keep_alive: Duration,
    /// MQTT 5 session expiry sent on connect, in seconds.
    pub session_expiry_secs: u32,
    pub credentials: Option<(String, Secret)>,
    pub tls: Option<(Arc<rustls::ClientConfig>, TlsConfig)>,
}

impl Endpoint {
    /// Builds the endpoint of `mqtt` at `host:port` and loads its TLS files.
    ///
    /// # Errors
    ///
    /// Returns a TLS file that cannot be read or parsed.
    pub fn new(
        mqtt: &MqttConfig,
        host: String,
        port: u16,
    ) -> Result<Self, crate::tls::TlsFileError> {
        let tls = match &mqtt.tls {
            Some(tls) => Some((crate::tls::client_config(tls)?, tls.clone())),
            None => None,
        };
        Ok(Self {
            host,
            port,
            protocol: mqtt.protocol,
            keep_alive: Duration::from_secs(mqtt.keep_alive_secs),
            session_expiry_secs: mqtt.session_expiry_secs.unwrap_or(u32::MAX),
            credentials: mqtt.username.clone().map(|user| {
                (
                    user,
                    mqtt.password.clone().unwrap_or_else(|| Secret::new("")),
                )
            }),
            tls,
        })
    }

    /// Builds a plain TCP endpoint without credentials, for the embedded
    /// broker.
    pub fn plain(host: String, port: u16, keep_alive: Duration) -> Self {
        Self {
            host,
            port,
            protocol: Protocol::V311,
            keep_alive,
            session_expiry_secs: u32::MAX,
            credentials: None,
            tls: None,
        }
    }
}

/// Per-connection settings on top of the [`Endpoint`].
pub struct Session<'a> {
    pub client_id: &'a str,
    /// Keep the session (subscriptions, unacknowledged messages) over a
    /// disconnect: `clean_session = false` on 3.1.1, clean start off and
    /// the endpoint's session expiry on 5.
    pub persistent: bool,
    /// Acknowledge incoming publishes only through [`Client::ack`].
    pub manual_acks: bool,
    pub max_incoming_bytes: usize,
    pub max_outgoing_bytes: usize,
    /// Capacity of the request channel between client and event loop.
    pub capacity: usize,
    /// MQTT 5 Receive Maximum: unacknowledged QoS 1 and 2 messages the
    /// broker may send at once. `None` leaves MQTT 5's default of 65535.
    pub receive_maximum: Option<u16>,
}

/// Creates a client and its event loop; nothing is sent before the first
/// [`EventLoop::poll`].
///
/// Nagle's algorithm is off on the connection (rumqttc leaves it on). With
/// it on, a small PUBACK or PUBLISH written while an earlier segment is
/// unacknowledged can wait for the peer's delayed ACK, up to 40 ms on
/// Linux. The broker needs the same setting for what it sends (Mosquitto:
/// `set_tcp_nodelay true`).
pub fn connect(endpoint: &Endpoint, session: &Session<'_>) -> (Client, EventLoop) {
    let transport = endpoint.tls.as_ref().map(|(config, _)| {
        rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(config.clone()))
    });
    let context = Arc::new(ErrorContext {
        host: endpoint.host.clone(),
        port: endpoint.port,
        tls: endpoint.tls.as_ref().map(|(_, tls)| tls.clone()),
    });
    match endpoint.protocol {
        Protocol::V311 => {
            let mut options =
                rumqttc::MqttOptions::new(session.client_id, &endpoint.host, endpoint.port);
            options.set_keep_alive(endpoint.keep_alive);
            options.set_max_packet_size(session.max_incoming_bytes, session.max_outgoing_bytes);
            options.set_clean_session(!session.persistent);
            options.set_manual_acks(session.manual_acks);
            if let Some((user, password)) = &endpoint.credentials {
                options.set_credentials(user, password.expose());
            }
            if let Some(transport) = transport {
                options.set_transport(transport);
            }
            let (client, mut eventloop) = rumqttc::AsyncClient::new(options, session.capacity);
            let mut network = eventloop.network_options();
            network.set_tcp_nodelay(true);
            eventloop.set_network_options(network);
            (
                Client::V311(client),
                EventLoop::V311(Box::new(eventloop), context),
            )
        }
        Protocol::V5 => {
            let mut options =
                v5::MqttOptions::new(session.client_id, &endpoint.host, endpoint.port);
            options.set_keep_alive(endpoint.keep_alive);
            // MQTT 5 sends this limit to the broker, which then drops bigger
            // messages without telling anyone. The host accepts up to the
            // protocol's maximum and dead-letters what exceeds its own
            // limit, as on 3.1.1.
            options.set_max_packet_size(Some(u32::try_from(MQTT_MAX_PACKET).unwrap_or(u32::MAX)));
            options.set_clean_start(!session.persistent);
            if session.persistent {
                options.set_session_expiry_interval(Some(endpoint.session_expiry_secs));
            }
            options.set_manual_acks(session.manual_acks);
            options.set_receive_maximum(session.receive_maximum);
            if let Some((user, password)) = &endpoint.credentials {
                options.set_credentials(user, password.expose());
            }
            if let Some(transport) = transport {
                options.set_transport(transport);
            }
            let mut network = options.network_options();
            network.set_tcp_nodelay(true);
            options.set_network_options(network);
            let (client, eventloop) = v5::AsyncClient::new(options, session.capacity);
            (
                Client::V5(client),
                EventLoop::V5(Box::new(eventloop), context),
            )
        }
    }
}

/// A request handle to one connection.
#[derive(Clone)]
pub enum Client {
    V311(rumqttc::AsyncClient),
    V5(v5::AsyncClient),
}

/// A request that could not be queued because the event loop is gone.
#[derive(Debug, thiserror::Error)]
#[error("the MQTT request was not queued: {0}")]
pub struct RequestError(String);

fn request<E: std::fmt::Display>(result: Result<(), E>) -> Result<(), RequestError> {
    result.map_err(|e| RequestError(e.to_string()))
}

impl Client {
    /// Subscribes to `filter`. A broker sends the filter's retained
    /// messages with the SUBACK. With `retained_again` false, an MQTT 5
    /// broker sends them only for a new subscription, not when a reconnect
    /// renews one that the kept session still has. They are then not
    /// processed once per reconnect. MQTT 3.1.1 has no such option: its
    /// brokers send them on every subscribe.
    pub async fn subscribe(
        &self,
        filter: &str,
        qos: QoS,
        retained_again: bool,
    ) -> Result<(), RequestError> {
        match self {
            Self::V311(client) => request(client.subscribe(filter, qos).await),
            Self::V5(client) => {
                let mut subscription = rumqttc::v5::mqttbytes::v5::Filter::new(filter, to_v5(qos));
                if !retained_again {
                    subscription.retain_forward_rule =
                        rumqttc::v5::mqttbytes::v5::RetainForwardRule::OnNewSubscribe;
                }
                request(client.subscribe_many([subscription]).await)
            }
        }
    }

    pub async fn unsubscribe(&self, filter: &str) -> Result<(), RequestError> {
        match self {
            Self::V311(client) => request(client.unsubscribe(filter).await),
            Self::V5(client) => request(client.unsubscribe(filter).await),
        }
    }

    /// Sends the PUBACK or PUBREC of `token`'s message.
    pub async fn ack(&self, token: &AckToken) -> Result<(), RequestError> {
        match (self, token) {
            (Self::V311(client), AckToken::V311(publish)) => request(client.ack(publish).await),
            (Self::V5(client), AckToken::V5(publish)) => request(client.ack(publish).await),
            _ => Err(RequestError(
                "the message came from a connection of the other MQTT version".to_owned(),
            )),
        }
    }

    /// Queues a publish without waiting. MQTT 5 sends `headers` as user
    /// properties, and [`CONTENT_TYPE_HEADER`] as the content type.
    pub fn try_publish(
        &self,
        topic: &str,
        qos: QoS,
        retain: bool,
        payload: Vec<u8>,
        headers: &[(String, String)],
    ) -> Result<(), RequestError> {
        match self {
            Self::V311(client) => request(client.try_publish(topic, qos, retain, payload)),
            Self::V5(client) => request(client.try_publish_with_properties(
                topic,
                to_v5(qos),
                retain,
                payload,
                properties(headers),
            )),
        }
    }

    /// Queues a publish like [`Client::try_publish`], waiting while the
    /// request channel is full.
    pub async fn publish(
        &self,
        topic: &str,
        qos: QoS,
        retain: bool,
        payload: Vec<u8>,
        headers: &[(String, String)],
    ) -> Result<(), RequestError> {
        match self {
            Self::V311(client) => request(client.publish(topic, qos, retain, payload).await),
            Self::V5(client) => request(
                client
                    .publish_with_properties(
                        topic,
                        to_v5(qos),
                        retain,
                        payload,
                        properties(headers),
                    )
                    .await,
            ),
        }
    }

    pub fn try_disconnect(&self) -> Result<(), RequestError> {
        match self {
            Self::V311(client) => request(client.try_disconnect()),
            Self::V5(client) => request(client.try_disconnect()),
        }
    }

    pub async fn disconnect(&self) -> Result<(), RequestError> {
        match self {
            Self::V311(client) => request(client.disconnect().await),
            Self::V5(client) => request(client.disconnect().await),
        }
    }
}

/// Turns headers into MQTT 5 publish properties.
fn properties(headers: &[(String, String)]) -> v5::mqttbytes::v5::PublishProperties {
    let mut properties = v5::mqttbytes::v5::PublishProperties::default();
    for (name, value) in headers {
        if name == CONTENT_TYPE_HEADER {
            properties.content_type = Some(value.clone());
        } else {
            properties
                .user_properties
                .push((name.clone(), value.clone()));
        }
    }
    properties
}

fn to_v5(qos: QoS) -> v5::mqttbytes::QoS {
    match qos {
        QoS::AtMostOnce => v5::mqttbytes::QoS::AtMostOnce,
        QoS::AtLeastOnce => v5::mqttbytes::QoS::AtLeastOnce,
        QoS::ExactlyOnce => v5::mqttbytes::QoS::ExactlyOnce,
    }
}

fn from_v5(qos: v5::mqttbytes::QoS) -> QoS {
    match qos {
        v5::mqttbytes::QoS::AtMostOnce => QoS::AtMostOnce,
        v5::mqttbytes::QoS::AtLeastOnce => QoS::AtLeastOnce,
        v5::mqttbytes::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

/// The received publish that an acknowledgement names, kept until the ack
/// goes out on the connection that delivered it.
#[derive(Debug, Clone)]
pub enum AckToken {
    V311(rumqttc::Publish),
    V5(v5::mqttbytes::v5::Publish),
}

impl AckToken {
    pub fn pkid(&self) -> u16 {
        match self {
            Self::V311(publish) => publish.pkid,
            Self::V5(publish) => publish.pkid,
        }
    }

    /// Returns the topic of the message, for fault injection in the tests.
    #[cfg(feature = "fault-injection")]
    pub fn topic(&self) -> String {
        match self {
            Self::V311(publish) => publish.topic.clone(),
            Self::V5(publish) => String::from_utf8_lossy(&publish.topic).into_owned(),
        }
    }
}

/// A received publish in the form both protocol versions share.
pub struct Incoming {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: QoS,
    pub retain: bool,
    /// MQTT 5 user properties, in order, then the content type as
    /// [`CONTENT_TYPE_HEADER`]. Empty on 3.1.1.
    pub headers: Vec<(String, String)>,
    pub ack: AckToken,
}

/// The events of a connection that the source and the sink act on.
pub enum Event {
    ConnAck {
        session_present: bool,
    },
    /// Boxed, because a publish is far bigger than the other events.
    Publish(Box<Incoming>),
    /// The broker answered a subscribe; `refused` filters were rejected.
    SubAck {
        pkid: u16,
        refused: usize,
    },
    /// PUBACK or PUBCOMP: the broker took an outgoing publish, or, with an
    /// MQTT 5 reason code in `refused`, rejected it.
    Acknowledged {
        pkid: u16,
        refused: Option<String>,
    },
    /// An outgoing publish was written, with the packet id rumqttc chose
    /// (0 for QoS 0).
    PublishWritten {
        pkid: u16,
    },
    /// rumqttc held an outgoing publish back because `pkid` is in flight.
    AwaitAck {
        pkid: u16,
    },
    DisconnectSent,
    Other,
}

/// The reader side of one connection.
pub enum EventLoop {
    V311(Box<rumqttc::EventLoop>, Arc<ErrorContext>),
    V5(Box<v5::EventLoop>, Arc<ErrorContext>),
}

/// What an error text names: the broker and its TLS settings.
pub struct ErrorContext {
    host: String,
    port: u16,
    tls: Option<TlsConfig>,
}

/// A failed connection, classified by what may help.
#[derive(Debug, thiserror::Error)]
#[error("{text}")]
pub struct ConnectionError {
    pub text: String,
    /// The broker or its certificate rejected this client. Retrying with
    /// the same settings fails the same way, so callers give up after a
    /// few attempts; other errors (broker down, network) are retried for
    /// ever.
    pub rejected: bool,
}

impl EventLoop {
    /// Waits for the next event. After an error, the next call connects
    /// again.
    pub async fn poll(&mut self) -> Result<Event, ConnectionError> {
        match self {
            Self::V311(eventloop, context) => match eventloop.poll().await {
                Ok(event) => Ok(from_v311(event)),
                Err(e) => Err(classify_v311(&e, context)),
            },
            Self::V5(eventloop, context) => match eventloop.poll().await {
                Ok(event) => Ok(from_v5_event(event)),
                Err(e) => Err(classify_v5(&e, context)),
            },
        }
    }
}

fn from_v311(event: rumqttc::Event) -> Event {
    use rumqttc::{Outgoing, Packet};

    match event {
        rumqttc::Event::Incoming(Packet::ConnAck(ack)) => Event::ConnAck {
            session_present: ack.session_present,
        },
        rumqttc::Event::Incoming(Packet::Publish(publish)) => Event::Publish(Box::new(Incoming {
            topic: publish.topic.clone(),
            payload: publish.payload.to_vec(),
            qos: publish.qos,
            retain: publish.retain,
            headers: Vec::new(),
            ack: AckToken::V311(publish),
        })),
        rumqttc::Event::Incoming(Packet::SubAck(ack)) => Event::SubAck {
            pkid: ack.pkid,
            refused: ack
                .return_codes
                .iter()
                .filter(|code| matches!(code, rumqttc::SubscribeReasonCode::Failure))
                .count(),
        },
        rumqttc::Event::Incoming(Packet::PubAck(rumqttc::PubAck { pkid }))
        | rumqttc::Event::Incoming(Packet::PubComp(rumqttc::PubComp { pkid })) => {
            Event::Acknowledged {
                pkid,
                refused: None,
            }
        }
        rumqttc::Event::Outgoing(Outgoing::Publish(pkid)) => Event::PublishWritten { pkid },
        rumqttc::Event::Outgoing(Outgoing::AwaitAck(pkid)) => Event::AwaitAck { pkid },
        rumqttc::Event::Outgoing(Outgoing::Disconnect) => Event::DisconnectSent,
        _ => Event::Other,
    }
}

fn from_v5_event(event: v5::Event) -> Event {
    use rumqttc::Outgoing;
    use v5::mqttbytes::v5::Packet;

    match event {
        v5::Event::Incoming(Packet::ConnAck(ack)) => Event::ConnAck {
            session_present: ack.session_present,
        },
        v5::Event::Incoming(Packet::Publish(publish)) => {
            let mut headers = Vec::new();
            if let Some(properties) = &publish.properties {
                headers.extend(properties.user_properties.iter().cloned());
                if let Some(content_type) = &properties.content_type {
                    headers.push((CONTENT_TYPE_HEADER.to_owned(), content_type.clone()));
                }
            }
            Event::Publish(Box::new(Incoming {
                // MQTT 5 topics are UTF-8 like 3.1.1's, and rumqttc has
                // checked the encoding; a lossy conversion only guards
                // against a broker that sends invalid bytes.
                topic: String::from_utf8_lossy(&publish.topic).into_owned(),
                payload: publish.payload.to_vec(),
                qos: from_v5(publish.qos),
                retain: publish.retain,
                headers,
                ack: AckToken::V5(publish),
            }))
        }
        v5::Event::Incoming(Packet::SubAck(ack)) => Event::SubAck {
            pkid: ack.pkid,
            refused: ack
                .return_codes
                .iter()
                .filter(|code| !matches!(code, v5::mqttbytes::v5::SubscribeReasonCode::Success(_)))
                .count(),
        },
        v5::Event::Incoming(Packet::PubAck(ack)) => {
            use v5::mqttbytes::v5::PubAckReason;
            let refused = match ack.reason {
                PubAckReason::Success | PubAckReason::NoMatchingSubscribers => None,
                other => Some(format!("{other:?}")),
            };
            Event::Acknowledged {
                pkid: ack.pkid,
                refused,
            }
        }
        v5::Event::Incoming(Packet::PubRec(rec)) => {
            use v5::mqttbytes::v5::PubRecReason;
            match rec.reason {
                PubRecReason::Success | PubRecReason::NoMatchingSubscribers => Event::Other,
                // A refused QoS 2 publish ends here; no PUBCOMP follows.
                other => Event::Acknowledged {
                    pkid: rec.pkid,
                    refused: Some(format!("{other:?}")),
                },
            }
        }
        v5::Event::Incoming(Packet::PubComp(comp)) => Event::Acknowledged {
            pkid: comp.pkid,
            refused: None,
        },
        v5::Event::Outgoing(Outgoing::Publish(pkid)) => Event::PublishWritten { pkid },
        v5::Event::Outgoing(Outgoing::AwaitAck(pkid)) => Event::AwaitAck { pkid },
        v5::Event::Outgoing(Outgoing::Disconnect) => Event::DisconnectSent,
        _ => Event::Other,
    }
}

fn refused(context: &ErrorContext, code: &str, fix: &str) -> ConnectionError {
    ConnectionError {
        text: format!(
            "broker {}:{} refused the connection ({code}); {fix}",
            context.host, context.port
        ),
        rejected: true,
    }
}

const CREDENTIALS_FIX: &str =
    "check mqtt.username and mqtt.password against the broker's password file";
const AUTHORISATION_FIX: &str = "the broker does not let this client connect: set mqtt.username and mqtt.password if it requires them, and check its ACL for this user and mqtt.client_id";

/// A TLS certificate problem, if `error` is one.
fn tls_problem(
    error: &(dyn std::error::Error + 'static),
    context: &ErrorContext,
) -> Option<ConnectionError> {
    let tls = context.tls.as_ref()?;
    let rustls_error = crate::tls::find_rustls_error(error)?;
    let text = crate::tls::explain(rustls_error, &context.host, context.port, tls)?;
    Some(ConnectionError {
        text,
        rejected: true,
    })
}

fn transient(error: &dyn std::fmt::Display, context: &ErrorContext) -> ConnectionError {
    ConnectionError {
        text: format!(
            "connection to broker {}:{} failed: {error}",
            context.host, context.port
        ),
        rejected: false,
    }
}

fn classify_v311(error: &rumqttc::ConnectionError, context: &ErrorContext) -> ConnectionError {
    use rumqttc::ConnectReturnCode as Code;

    match error {
        rumqttc::ConnectionError::ConnectionRefused(Code::BadUserNamePassword) => {
            refused(context, "bad user name or password", CREDENTIALS_FIX)
        }
        rumqttc::ConnectionError::ConnectionRefused(Code::NotAuthorized) => {
            refused(context, "not authorised", AUTHORISATION_FIX)
        }
        rumqttc::ConnectionError::ConnectionRefused(Code::BadClientId) => refused(
            context,
            "client id rejected",
            "set an mqtt.client_id that the broker accepts",
        ),
        other => tls_problem(other, context).unwrap_or_else(|| transient(other, context)),
    }
}

fn classify_v5(error: &v5::ConnectionError, context: &ErrorContext) -> ConnectionError {
    use v5::mqttbytes::v5::ConnectReturnCode as Code;

    match error {
        v5::ConnectionError::ConnectionRefused(Code::BadUserNamePassword) => {
            refused(context, "bad user name or password", CREDENTIALS_FIX)
        }
        v5::ConnectionError::ConnectionRefused(Code::NotAuthorized | Code::Banned) => {
            refused(context, "not authorised", AUTHORISATION_FIX)
        }
        v5::ConnectionError::ConnectionRefused(
            Code::BadClientId | Code::ClientIdentifierNotValid,
        ) => refused(
            context,
            "client id rejected",
            "set an mqtt.client_id that the broker accepts",
        ),
        v5::ConnectionError::ConnectionRefused(Code::BadAuthenticationMethod) => {
            refused(context, "bad authentication method", CREDENTIALS_FIX)
        }
        other => tls_problem(other, context).unwrap_or_else(|| transient(other, context)),
    }
}
