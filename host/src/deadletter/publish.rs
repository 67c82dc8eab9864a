//! The MQTT connection that replay publishes through. Unlike the host's
//! republish sink, it waits until the broker has confirmed every message,
//! because replay deletes a dead letter once it is delivered.

use std::time::Duration;

use anyhow::{bail, Context as _};
use rumqttc::QoS;
use tokio::sync::mpsc;

use crate::mqtt::{Client, Endpoint, Event};
use tokio::task::JoinHandle;

/// Time to connect, and to get every confirmation of one batch.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// One message to publish.
pub struct Publish {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: QoS,
    pub retain: bool,
    /// Sent as MQTT 5 user properties, as the host's MQTT sink does.
    pub headers: Vec<(String, String)>,
}

enum DriverEvent {
    Connected,
    /// A QoS 0 message was written, or a QoS 1 or 2 message was confirmed
    /// (PUBACK or PUBCOMP).
    Completed,
    Failed(String),
}

/// A connection with clean session and its own client id, so that it never
/// takes over a session of the running host.
pub struct Publisher {
    client: Client,
    events: mpsc::UnboundedReceiver<DriverEvent>,
    driver: JoinHandle<()>,
    address: String,
}

impl Publisher {
    /// Connects to `endpoint` (with its TLS, credentials and protocol) and
    /// waits for the broker's CONNACK.
    ///
    /// # Errors
    ///
    /// Fails when the connection is refused or not made within 10 s.
    pub async fn connect(
        endpoint: &Endpoint,
        client_id: String,
        max_packet_bytes: usize,
    ) -> anyhow::Result<Self> {
        let address = format!("{}:{}", endpoint.host, endpoint.port);
        let (client, mut eventloop) = crate::mqtt::connect(
            endpoint,
            &crate::mqtt::Session {
                client_id: &client_id,
                persistent: false,
                manual_acks: false,
                max_incoming_bytes: max_packet_bytes,
                max_outgoing_bytes: max_packet_bytes,
                capacity: 1024,
                receive_maximum: None,
            },
        );
        let (events_tx, events) = mpsc::unbounded_channel();
        let driver = tokio::spawn(async move {
            loop {
                let event = match eventloop.poll().await {
                    Ok(Event::ConnAck { .. }) => DriverEvent::Connected,
                    Ok(Event::Acknowledged { refused: None, .. }) => DriverEvent::Completed,
                    Ok(Event::Acknowledged {
                        refused: Some(reason),
                        ..
                    }) => DriverEvent::Failed(format!(
                        "the broker refused a replayed message with reason {reason}; check its ACL"
                    )),
                    // QoS 0 messages have packet id 0 and no confirmation.
                    Ok(Event::PublishWritten { pkid: 0 }) => DriverEvent::Completed,
                    Ok(Event::DisconnectSent) => break,
                    Ok(_) => continue,
                    Err(e) => {
                        let _ = events_tx.send(DriverEvent::Failed(e.to_string()));
                        break;
                    }
                };
                if events_tx.send(event).is_err() {
                    break;
                }
            }
        });

        let mut publisher = Self {
            client,
            events,
            driver,
            address,
        };
        let first = tokio::time::timeout(CONNECT_TIMEOUT, publisher.events.recv()).await;
        match first {
            Ok(Some(DriverEvent::Connected)) => Ok(publisher),
            Ok(Some(DriverEvent::Failed(reason))) => bail!(
                "cannot connect to the broker at {}: {reason}",
                publisher.address
            ),
            Ok(Some(DriverEvent::Completed) | None) => bail!(
                "the connection to the broker at {} ended",
                publisher.address
            ),
            Err(_) => bail!(
                "the broker at {} did not accept the connection within 10 s",
                publisher.address
            ),
        }
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// Publishes `messages` in order and waits until the broker has
    /// confirmed every one of them.
    ///
    /// # Errors
    ///
    /// Fails when the connection breaks or the confirmations take more than
    /// 30 s. Some of the messages may have been delivered then.
    pub async fn publish_all(&mut self, messages: Vec<Publish>) -> anyhow::Result<()> {
        let total = messages.len();
        for message in messages {
            self.client
                .publish(
                    &message.topic,
                    message.qos,
                    message.retain,
                    message.payload,
                    &message.headers,
                )
                .await
                .with_context(|| {
                    format!("the connection to the broker at {} is closed", self.address)
                })?;
        }
        let mut completed = 0;
        let wait = async {
            while completed < total {
                match self.events.recv().await {
                    Some(DriverEvent::Completed) => completed += 1,
                    Some(DriverEvent::Connected) => {}
                    Some(DriverEvent::Failed(reason)) => {
                        bail!(
                            "the connection to the broker at {} failed: {reason}",
                            self.address
                        )
                    }
                    None => bail!("the connection to the broker at {} ended", self.address),
                }
            }
            Ok(())
        };
        let outcome = tokio::time::timeout(CONFIRM_TIMEOUT, wait).await;
        match outcome {
            Ok(result) => result,
            Err(_) => bail!(
                "the broker at {} confirmed only {completed} of {total} messages within 30 s",
                self.address
            ),
        }
    }

    /// Sends DISCONNECT and waits up to 5 s for the connection to close.
    pub async fn disconnect(self) {
        if self.client.disconnect().await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(5), self.driver).await;
        } else {
            self.driver.abort();
        }
    }
}
