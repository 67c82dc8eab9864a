//! The embedded MQTT broker (rumqttd), for the quick start and single-node
//! edge gateways, and broker address parsing.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// Splits `host:port` into its parts; `None` when it is not of that form.
pub fn parse_address(address: &str) -> Option<(String, u16)> {
    let (host, port) = address.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return None;
    }
    Some((host.to_owned(), port))
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("embedded broker: cannot listen on {listen}: {source}; pick another embedded_broker.listen, or port 0 for a free one")]
    NoPort {
        listen: SocketAddr,
        source: std::io::Error,
    },
    #[error("embedded broker did not accept connections on {0} within 10 s")]
    NotReady(SocketAddr),
    #[error("embedded broker: cannot start its thread: {0}")]
    Thread(std::io::Error),
}

/// Starts rumqttd on `listen` in a background thread and waits until it
/// accepts connections. Port 0 picks a free port. Returns the bound address.
///
/// The broker lives until the process exits: rumqttd has no stop call.
///
/// # Errors
///
/// Fails when no port can be bound or the broker does not come up.
pub fn start_embedded(
    listen: SocketAddr,
    max_payload_bytes: usize,
) -> Result<SocketAddr, BrokerError> {
    // rumqttd cannot report the port it bound, so pick one here. Another
    // process could take it in between; the readiness check below then fails
    // with a clear error instead of connecting to the wrong broker silently.
    // rumqttd cannot report the port it bound, so pick one here. Binding
    // first also catches a fixed port that another broker holds, which the
    // readiness check below would take for the embedded broker. Another
    // process could still take the port in between.
    let probe =
        TcpListener::bind(listen).map_err(|source| BrokerError::NoPort { listen, source })?;
    let address = probe
        .local_addr()
        .map_err(|source| BrokerError::NoPort { listen, source })?;
    drop(probe);

    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: max_payload_bytes,
        max_inflight_count: 500,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = rumqttd::ServerSettings {
        name: "eliot-embedded".to_owned(),
        listen: address,
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 10_000,
            max_outgoing_packet_count: 200,
            max_segment_size: 100 * 1024 * 1024,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("eliot".to_owned(), server)])),
        ..Default::default()
    };

    std::thread::Builder::new()
        .name("eliot-broker".to_owned())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(BrokerError::Thread)?;

    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_err() {
        if Instant::now() > deadline {
            return Err(BrokerError::NotReady(address));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(address)
}
