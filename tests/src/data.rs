//! The sensor data bundled in host/data, as the device messages that the
//! host's simulator publishes for it, so that tests can compute the expected
//! output of a replay.
//!
//! Every message goes to `devices/{device_id}/telemetry` with a JSON payload
//! of `device_id`, `timestamp`, `sensor_type` and `data`. Numbers are the CSV
//! strings parsed as `f64`. The office payloads omit `device_id`, because the
//! office sensors' firmware relies on the topic for it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::{json, Map, Value};
use time::format_description::well_known::Rfc3339;
use time::macros::{datetime, format_description};
use time::{Date, Duration, Month, PrimitiveDateTime, UtcOffset};

/// Sea temperature of a buoy: 19,226 half-hourly rows with UTC timestamps.
pub const BUOY_FILE: &str = "buoy-sea-temperature.csv";
/// A bike's GPS track: 978 rows without timestamps.
pub const GPS_FILE: &str = "gps-track.csv";
/// An office room's environment sensors: 509 rows in local time of Mons,
/// Belgium, without a UTC offset.
pub const OFFICE_FILE: &str = "office-occupancy.csv";
/// Water flow in a pipe: 1,268 hourly rows with UTC offsets.
pub const WATER_FLOW_FILE: &str = "water-flow.csv";

pub const BUOY_DEVICE: &str = "buoy_b01";
pub const GPS_DEVICE: &str = "bike_001";
pub const OFFICE_DEVICE: &str = "office_room_1";
pub const WATER_FLOW_DEVICE: &str = "pipe_001";

/// Time of the first GPS row. Row `i` is timestamped `i` seconds later.
pub const GPS_START: PrimitiveDateTime = datetime!(2025-06-05 14:30:00);

/// One MQTT message of the simulator.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceMessage {
    /// `devices/{device_id}/telemetry`.
    pub topic: String,
    /// Device id, present in the topic even where the payload omits it.
    pub device_id: String,
    pub payload: Value,
}

impl DeviceMessage {
    /// Serializes the payload as compact JSON, as it goes over MQTT.
    pub fn payload_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.payload).expect("a JSON value always serializes")
    }

    /// Returns the payload's `data` object.
    pub fn data(&self) -> &Map<String, Value> {
        self.payload["data"]
            .as_object()
            .expect("every device message has a data object")
    }
}

/// Returns the folder of the bundled CSV files, host/data in the workspace.
pub fn data_dir() -> PathBuf {
    crate::workspace_root().join("host").join("data")
}

/// Returns the messages of all four files: buoy, GPS, office, then water
/// flow, each in file order.
pub fn expected_messages() -> Vec<DeviceMessage> {
    let mut messages = buoy_messages();
    messages.extend(gps_messages());
    messages.extend(office_messages());
    messages.extend(water_flow_messages());
    messages
}

/// Converts messages into `(topic, payload)` pairs for [`crate::mqtt::publish_all`].
pub fn to_publishes(messages: &[DeviceMessage]) -> Vec<(String, Vec<u8>)> {
    messages
        .iter()
        .map(|message| (message.topic.clone(), message.payload_bytes()))
        .collect()
}

/// Returns the first `n` messages of the bundled data, devices interleaved.
pub fn interleaved_messages(n: usize) -> Vec<DeviceMessage> {
    let mut devices: BTreeMap<String, std::vec::IntoIter<DeviceMessage>> = BTreeMap::new();
    for message in expected_messages() {
        devices.entry(message.device_id.clone()).or_default();
    }
    let all = expected_messages();
    for (device, queue) in &mut devices {
        *queue = all
            .iter()
            .filter(|m| &m.device_id == device)
            .cloned()
            .collect::<Vec<_>>()
            .into_iter();
    }
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let before = out.len();
        for queue in devices.values_mut() {
            if out.len() < n {
                out.extend(queue.next());
            }
        }
        assert!(
            out.len() > before,
            "the bundled data has fewer than {n} rows"
        );
    }
    out
}


/// Returns the messages of buoy-sea-temperature.csv: sensor type
/// `temperature`, the `time (UTC)` column as the timestamp and
/// `{"temperature_c": value}` as data.
pub fn buoy_messages() -> Vec<DeviceMessage> {
    let file = read_csv(BUOY_FILE, &["time (UTC)", "temperature (celsius)"]);
    file.rows
        .iter()
        .enumerate()
        .map(|(index, row)| {
            let data = json!({ "temperature_c": file.number(index, row, 1) });
            device_message(BUOY_DEVICE, true, &row[0], "temperature", data)
        })
        .collect()
}

/// Returns the messages of gps-track.csv: sensor type `gps`, a timestamp of
/// [`GPS_START`] plus the row index in seconds, and latitude, longitude and
/// altitude as data.
pub fn gps_messages() -> Vec<DeviceMessage> {
    let file = read_csv(GPS_FILE, &["lon", "lat", "alt"]);
    file.rows
        .iter()
        .enumerate()
        .map(|(index, row)| {
            let timestamp = gps_timestamp(index);
            let data = json!({
                "latitude": file.number(index, row, 1),
                "longitude": file.number(index, row, 0),
                "altitude_m": file.number(index, row, 2),
            });
            device_message(GPS_DEVICE, true, &timestamp, "gps", data)
        })
        .collect()
}

/// Returns the messages of office-occupancy.csv: sensor type `environment`,
/// the local time with the Belgian UTC offset, and temperature, humidity,
/// light and CO2 as data. The payloads have no `device_id`.
pub fn office_messages() -> Vec<DeviceMessage> {
    let file = read_csv(OFFICE_FILE, &["time", "V1", "V2", "V3", "V4"]);
    file.rows
        .iter()
        .enumerate()
        .map(|(index, row)| {
            let timestamp = office_timestamp(&row[0]).unwrap_or_else(|err| {
                panic!(
                    "{OFFICE_FILE} line {}: invalid time {:?}: {err}",
                    line_number(index),
                    &row[0]
                )
            });
            let data = json!({
                "temperature_c": file.number(index, row, 1),
                "humidity_pct": file.number(index, row, 2),
                "light_lux": file.number(index, row, 3),
                "co2_ppm": file.number(index, row, 4),
            });
            device_message(OFFICE_DEVICE, false, &timestamp, "environment", data)
        })
        .collect()
}

/// Returns the messages of water-flow.csv: sensor type `flow`, the `Time`
/// column as the timestamp and `{"flow_lps": value}` as data.
pub fn water_flow_messages() -> Vec<DeviceMessage> {
    let file = read_csv(WATER_FLOW_FILE, &["Time", "Water flow [l/s]"]);
    file.rows
        .iter()
        .enumerate()
        .map(|(index, row)| {
            let data = json!({ "flow_lps": file.number(index, row, 1) });
            device_message(WATER_FLOW_DEVICE, true, &row[0], "flow", data)
        })
        .collect()
}

/// Formats the timestamp of GPS row `index` as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn gps_timestamp(index: usize) -> String {
    let seconds = i64::try_from(index).expect("row indexes fit in i64");
    let time = GPS_START + Duration::seconds(seconds);
    time.format(format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second]Z"
    ))
    .expect("the GPS format has only date and time components")
}

/// Converts a local time of Mons, Belgium, written `YYYY-MM-DD HH:MM:SS`,
/// into RFC 3339 with its UTC offset, for example `2015-02-04 17:51:00` into
/// `2015-02-04T17:51:00+01:00`.
///
/// The offset follows the EU summer-time rule that applied in 2015: CEST
/// (+02:00) from 02:00 local time on the last Sunday of March until 03:00 local time on the
/// last Sunday of October, otherwise CET (+01:00). In the repeated hour of
/// October, 02:00 to 02:59 is taken as CEST.
pub fn office_timestamp(local: &str) -> Result<String, time::error::Parse> {
    let local = PrimitiveDateTime::parse(
        local,
        format_description!("[year]-[month]-[day] [hour]:[minute]:[second]"),
    )?;
    let offset = belgian_offset(local);
    let timestamp = local
        .assume_offset(offset)
        .format(&Rfc3339)
        .expect("a date of the data files formats as RFC 3339");
    Ok(timestamp)
}

fn belgian_offset(local: PrimitiveDateTime) -> UtcOffset {
    let year = local.year();
    let summer_start = last_sunday(year, Month::March)
        .with_hms(2, 0, 0)
        .expect("valid time");
    let summer_end = last_sunday(year, Month::October)
        .with_hms(3, 0, 0)
        .expect("valid time");
    let hours = if summer_start <= local && local < summer_end {
        2
    } else {
        1
    };
    UtcOffset::from_hms(hours, 0, 0).expect("a whole number of hours is a valid offset")
}

fn last_sunday(year: i32, month: Month) -> Date {
    let last_day = time::util::days_in_month(month, year);
    let date = Date::from_calendar_date(year, month, last_day).expect("valid calendar date");
    let days_after_sunday = date.weekday().number_days_from_sunday();
    date - Duration::days(i64::from(days_after_sunday))
}

fn device_message(
    device_id: &str,
    include_device_id: bool,
    timestamp: &str,
    sensor_type: &str,
    data: Value,
) -> DeviceMessage {
    let mut payload = Map::new();
    if include_device_id {
        payload.insert("device_id".into(), device_id.into());
    }
    payload.insert("timestamp".into(), timestamp.into());
    payload.insert("sensor_type".into(), sensor_type.into());
    payload.insert("data".into(), data);

    DeviceMessage {
        topic: format!("devices/{device_id}/telemetry"),
        device_id: device_id.to_owned(),
        payload: Value::Object(payload),
    }
}

struct CsvFile {
    name: &'static str,
    rows: Vec<csv::StringRecord>,
}

impl CsvFile {
    /// Parses column `column` of a row as a JSON number.
    fn number(&self, index: usize, row: &csv::StringRecord, column: usize) -> Value {
        let text = &row[column];
        let number: f64 = text.parse().unwrap_or_else(|err| {
            panic!(
                "{} line {} column {}: invalid number {text:?}: {err}",
                self.name,
                line_number(index),
                column + 1
            )
        });
        Value::from(number)
    }
}

/// Returns the file line of data row `index`: line 1 is the header.
fn line_number(index: usize) -> usize {
    index + 2
}

/// Reads a bundled CSV file and checks its header, so that a changed file
/// fails loudly instead of shifting columns.
fn read_csv(name: &'static str, expected_header: &[&str]) -> CsvFile {
    let path = data_dir().join(name);
    let mut reader = csv::Reader::from_path(&path)
        .unwrap_or_else(|err| panic!("failed to open {}: {err}", path.display()));

    let header = reader
        .headers()
        .unwrap_or_else(|err| panic!("failed to read the header of {}: {err}", path.display()));
    assert_eq!(
        header.iter().collect::<Vec<_>>(),
        expected_header,
        "unexpected header in {}",
        path.display()
    );

    let rows = reader
        .records()
        .enumerate()
        .map(|(index, row)| {
            row.unwrap_or_else(|err| {
                panic!(
                    "{} line {}: invalid CSV: {err}",
                    path.display(),
                    line_number(index)
                )
            })
        })
        .collect();
    CsvFile { name, rows }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::Weekday;

    #[test]
    fn last_sunday_of_march_and_october() {
        assert_eq!(
            last_sunday(2015, Month::March),
            datetime!(2015-03-29 0:00).date()
        );
        assert_eq!(
            last_sunday(2015, Month::October),
            datetime!(2015-10-25 0:00).date()
        );
        assert_eq!(last_sunday(2022, Month::March).weekday(), Weekday::Sunday);
    }

    #[test]
    fn office_timestamp_winter_and_summer() {
        assert_eq!(
            office_timestamp("2015-02-04 17:51:00").unwrap(),
            "2015-02-04T17:51:00+01:00"
        );
        assert_eq!(
            office_timestamp("2015-03-29 01:59:00").unwrap(),
            "2015-03-29T01:59:00+01:00"
        );
        assert_eq!(
            office_timestamp("2015-03-29 03:00:00").unwrap(),
            "2015-03-29T03:00:00+02:00"
        );
        assert_eq!(
            office_timestamp("2015-10-25 02:30:00").unwrap(),
            "2015-10-25T02:30:00+02:00"
        );
        assert_eq!(
            office_timestamp("2015-10-25 03:00:00").unwrap(),
            "2015-10-25T03:00:00+01:00"
        );
    }

    #[test]
    fn office_timestamp_rejects_other_formats() {
        assert!(office_timestamp("2015-02-04T17:51:00").is_err());
    }

    #[test]
    fn gps_timestamp_counts_seconds() {
        assert_eq!(gps_timestamp(0), "2025-06-05T14:30:00Z");
        assert_eq!(gps_timestamp(61), "2025-06-05T14:31:01Z");
    }
}
