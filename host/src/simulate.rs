//! The device simulator: replays the bundled real sensor data as device
//! telemetry over MQTT.
//!
//! Four devices, one per data set in `host/data` (see `SOURCES.md` there
//! for where each comes from and its licence):
//!
//! | device | sensor_type | data fields | source file |
//! |---|---|---|---|
//! | `buoy_b01` | `temperature` | `temperature_c` | buoy-sea-temperature.csv |
//! | `bike_001` | `gps` | `latitude`, `longitude`, `altitude_m` | gps-track.csv |
//! | `office_room_1` | `environment` | `temperature_c`, `humidity_pct`, `light_lux`, `co2_ppm` | office-occupancy.csv |
//! | `pipe_001` | `flow` | `flow_lps` | water-flow.csv |
//!
//! Timestamps: the buoy and water-flow files carry RFC 3339 times, sent as
//! they are. The GPS track has none, so row `i` is stamped
//! 2025-06-05T14:30:00Z plus `i` seconds. The office data is local time in
//! Mons, Belgium, all in February, so `+01:00` (CET) is appended. The office
//! payloads carry no `device_id`, as firmware that relies on its topic would
//! send them; the enrich plugin takes it from the topic.

use std::time::Duration;

use anyhow::Context as _;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use serde_json::{json, Map, Value};

const BUOY: &str = include_str!("../data/buoy-sea-temperature.csv");
const GPS: &str = include_str!("../data/gps-track.csv");
const OFFICE: &str = include_str!("../data/office-occupancy.csv");
const WATER: &str = include_str!("../data/water-flow.csv");

/// First timestamp of the GPS track, which has no times of its own.
const GPS_START_UNIX: i64 = 1_749_133_800; // 2025-06-05T14:30:00Z

/// One simulated device message.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceMessage {
    pub device_id: &'static str,
    pub topic: String,
    pub payload: Value,
}

/// Every row of the bundled data as device messages, in file order per
/// device.
///
/// # Errors
///
/// Fails only if the bundled files are malformed, naming file and row.
pub fn bundled_messages() -> anyhow::Result<Vec<Vec<DeviceMessage>>> {
    Ok(vec![
        rows(
            BUOY,
            "buoy-sea-temperature.csv",
            "buoy_b01",
            "temperature",
            |row, _| {
                Ok((
                    row[0].to_owned(),
                    json!({ "temperature_c": number(&row[1])? }),
                ))
            },
        )?,
        rows(GPS, "gps-track.csv", "bike_001", "gps", |row, index| {
            let time = time::OffsetDateTime::from_unix_timestamp(GPS_START_UNIX + index as i64)?;
            let stamp = time.format(&time::format_description::well_known::Rfc3339)?;
            Ok((
                stamp,
                json!({ "latitude": number(&row[1])?, "longitude": number(&row[0])?, "altitude_m": number(&row[2])? }),
            ))
        })?,
        rows(
            OFFICE,
            "office-occupancy.csv",
            "office_room_1",
            "environment",
            |row, _| {
                let stamp = format!("{}+01:00", row[0].replacen(' ', "T", 1));
                Ok((
                    stamp,
                    json!({
                        "temperature_c": number(&row[1])?,
                        "humidity_pct": number(&row[2])?,
                        "light_lux": number(&row[3])?,
                        "co2_ppm": number(&row[4])?,
                    }),
                ))
            },
        )?,
        rows(WATER, "water-flow.csv", "pipe_001", "flow", |row, _| {
            Ok((row[0].to_owned(), json!({ "flow_lps": number(&row[1])? })))
        })?,
    ])
}

fn number(text: &str) -> anyhow::Result<Value> {
    let value: f64 = text
        .trim()
        .parse()
        .with_context(|| format!("\"{text}\" is not a number"))?;
    serde_json::Number::from_f64(value)
        .map(Value::Number)
        .with_context(|| format!("{text} is not finite"))
}

fn rows(
    csv_text: &str,
    file: &str,
    device_id: &'static str,
    sensor_type: &str,
    convert: impl Fn(&csv::StringRecord, usize) -> anyhow::Result<(String, Value)>,
) -> anyhow::Result<Vec<DeviceMessage>> {
    let mut reader = csv::Reader::from_reader(csv_text.as_bytes());
    let mut messages = Vec::new();
    for (index, row) in reader.records().enumerate() {
        let row = row.with_context(|| format!("{file}: row {}", index + 2))?;
        let (timestamp, data) =
            convert(&row, index).with_context(|| format!("{file}: row {}", index + 2))?;
        let mut payload = Map::new();
        // Office sensors send no device id; see the module documentation.
        if device_id != "office_room_1" {
            payload.insert("device_id".to_owned(), device_id.into());
        }
        payload.insert("timestamp".to_owned(), timestamp.into());
        payload.insert("sensor_type".to_owned(), sensor_type.into());
        payload.insert("data".to_owned(), data);
        messages.push(DeviceMessage {
            device_id,
            topic: format!("devices/{device_id}/telemetry"),
            payload: Value::Object(payload),
        });
    }
    Ok(messages)
}

/// What to replay and how fast.
#[derive(Debug, Clone)]
pub struct SimulateOptions {
    pub host: String,
    pub port: u16,
    /// Messages per second over all devices; 0 sends as fast as the broker
    /// acknowledges.
    pub rate: u32,
    /// Rows per device at most; `None` replays every row.
    pub limit: Option<usize>,
    pub qos: QoS,
    pub client_id: String,
}

/// Publishes the bundled data, interleaving the devices round-robin as a
/// fleet would, and returns once the broker acknowledged every QoS 1 or 2
/// message. Returns the number of messages published.
///
/// # Errors
///
/// Fails when the connection breaks; messages not yet acknowledged are then
/// not counted as published.
pub async fn replay(options: &SimulateOptions) -> anyhow::Result<u64> {
    let devices = bundled_messages()?;
    let mut queues: Vec<std::vec::IntoIter<DeviceMessage>> = devices
        .into_iter()
        .map(|rows| match options.limit {
            Some(limit) => rows.into_iter().take(limit).collect::<Vec<_>>().into_iter(),
            None => rows.into_iter(),
        })
        .collect();
    let mut order = Vec::new();
    loop {
        let before = order.len();
        for queue in &mut queues {
            if let Some(message) = queue.next() {
                order.push(message);
            }
        }
        if order.len() == before {
            break;
        }
    }
    let total = order.len() as u64;

    let mut mqtt = MqttOptions::new(
        options.client_id.clone(),
        options.host.clone(),
        options.port,
    );
    mqtt.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(mqtt, 256);

    let qos = options.qos;
    let rate = options.rate;
    let publisher = tokio::spawn(async move {
        let mut ticker = (rate > 0).then(|| {
            let mut interval =
                tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            interval
        });
        for message in order {
            if let Some(ticker) = ticker.as_mut() {
                ticker.tick().await;
            }
            client
                .publish(message.topic, qos, false, message.payload.to_string())
                .await?;
        }
        anyhow::Ok(client)
    });

    // Drive the connection until every publish is confirmed.
    let mut sent = 0u64;
    let mut confirmed = 0u64;
    let mut publisher = Some(publisher);
    let mut client = None;
    while confirmed < total {
        let event = eventloop
            .poll()
            .await
            .context("simulator lost its broker connection")?;
        match event {
            Event::Incoming(Packet::PubAck(_)) | Event::Incoming(Packet::PubComp(_)) => {
                confirmed += 1
            }
            Event::Outgoing(Outgoing::Publish(_)) => {
                sent += 1;
                if qos == QoS::AtMostOnce {
                    confirmed += 1;
                }
            }
            _ => {}
        }
        if sent == total {
            if let Some(task) = publisher.take() {
                client = Some(task.await.context("simulator publisher task")??);
            }
        }
    }
    if let Some(client) = client {
        client.disconnect().await.ok();
        let drain = async { while eventloop.poll().await.is_ok() {} };
        let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_data_has_every_row() {
        let devices = bundled_messages().unwrap();
        let counts: Vec<usize> = devices.iter().map(Vec::len).collect();
        assert_eq!(counts, vec![19_226, 978, 509, 1_268]);
    }

    #[test]
    fn rows_become_device_messages() {
        let devices = bundled_messages().unwrap();
        assert_eq!(
            devices[0][0].payload,
            json!({"device_id": "buoy_b01", "timestamp": "2016-02-15T00:00:00Z", "sensor_type": "temperature", "data": {"temperature_c": 4.929}})
        );
        assert_eq!(devices[1][1].payload["timestamp"], "2025-06-05T14:30:01Z");
        assert_eq!(devices[1][0].payload["data"]["latitude"], json!(51.5782653));
        assert_eq!(devices[2][0].payload.get("device_id"), None);
        assert_eq!(
            devices[2][0].payload["timestamp"],
            "2015-02-04T17:51:00+01:00"
        );
        assert_eq!(devices[2][0].topic, "devices/office_room_1/telemetry");
        assert_eq!(devices[3][0].payload["data"]["flow_lps"], json!(100.59));
    }
}
