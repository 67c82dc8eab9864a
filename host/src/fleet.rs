//! The devices the host has heard from: first and last seen, message count,
//! and online state from status messages. The admin API lists them.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Returns the device id of a message on `topic` when no pipeline's device
/// key named it, for the device registry, the logs and the per-message
/// span. The id is the second
/// topic level, as in `devices/{id}/telemetry` and `devices/{id}/status`;
/// a topic with a single level is its own id.
///
/// A pipeline with a `device_key` names the device itself: the source
/// registers that id, and [`device_of`] prefers the header it sets.
pub fn device_id(topic: &str) -> &str {
    let mut levels = topic.split('/');
    let first = levels.next().unwrap_or(topic);
    match levels.next() {
        Some(second) if !second.is_empty() => second,
        _ => first,
    }
}

/// Returns the device id of a routed message: its `device_id` header, which
/// a pipeline's device key sets, or else [`device_id`] of its topic.
pub fn device_of<'m>(topic: &'m str, headers: &'m [(String, String)]) -> &'m str {
    headers
        .iter()
        .find(|(name, _)| name == crate::device::DEVICE_ID_HEADER)
        .map_or_else(|| device_id(topic), |(_, id)| id.as_str())
}

/// The status a device announced on its status topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceStatus {
    Online,
    Offline,
}

impl DeviceStatus {
    /// Parses a status payload: `online` or `offline`, in any case, with
    /// surrounding white space ignored. Anything else is `None`.
    pub fn parse(payload: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(payload).ok()?.trim();
        if text.eq_ignore_ascii_case("online") {
            Some(Self::Online)
        } else if text.eq_ignore_ascii_case("offline") {
            Some(Self::Offline)
        } else {
            None
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Online => "online",
            Self::Offline => "offline",
        }
    }
}

/// The host's record of one device. Times are ms since the Unix epoch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Device {
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    /// Messages received from the device and routed to a pipeline,
    /// redeliveries included. Status messages are not counted.
    pub messages: u64,
    /// `None` until the device published a status.
    pub status: Option<DeviceStatus>,
    pub status_changed_ms: Option<u64>,
}

/// A change that the caller logs and counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusChange {
    /// The status differs from the last one known (or none was known).
    Changed {
        from: Option<DeviceStatus>,
        device: Device,
    },
    /// The device repeated its status, for example a retained message
    /// delivered again after a reconnect.
    Repeated,
}

/// Devices the registry keeps when `devices.max_tracked` is not set: about
/// 15 MB with ids of 30 bytes.
pub const DEFAULT_MAX_DEVICES: usize = 100_000;

/// Every device seen since the host started, up to a limit. Locked for one
/// update or one read of the whole map; both are short.
///
/// The registry lives in memory, so it starts empty after a restart. It is
/// bounded, because device ids come from topics and payloads, which any
/// client allowed to publish chooses. At the limit, the least recently
/// seen tenth is forgotten at once. The sort this takes is then paid once
/// per tenth of the limit of new devices, not per message. A forgotten
/// device that sends again is new, with its count from then on.
#[derive(Debug)]
pub struct Fleet {
    devices: Mutex<BTreeMap<String, Device>>,
    max: usize,
    /// Devices forgotten to stay within the limit.
    pub evicted: prometheus_client::metrics::counter::Counter,
}

impl Default for Fleet {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_DEVICES)
    }
}

impl Fleet {
    /// Returns an empty registry that keeps at most `max` devices.
    pub fn new(max: usize) -> Self {
        Self {
            devices: Mutex::default(),
            max: max.max(1),
            evicted: prometheus_client::metrics::counter::Counter::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Device>> {
        self.devices.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets the least recently seen tenth of the devices when `device`
    /// is new and the registry is full.
    fn make_room(&self, devices: &mut BTreeMap<String, Device>, device: &str) {
        if devices.len() < self.max || devices.contains_key(device) {
            return;
        }
        let mut seen: Vec<(u64, String)> = devices
            .iter()
            .map(|(id, d)| (d.last_seen_ms, id.clone()))
            .collect();
        let forget = (self.max / 10).max(1).min(seen.len());
        seen.select_nth_unstable(forget - 1);
        for (_, id) in &seen[..forget] {
            devices.remove(id);
        }
        self.evicted.inc_by(forget as u64);
        tracing::warn!(
            forgotten = forget,
            max_tracked = self.max,
            "device registry full; forgot the least recently seen devices (raise devices.max_tracked if the fleet is this large)"
        );
    }

    /// Records a message from `device` at `now_ms`. Returns `true` when the
    /// device was not known before.
    pub fn message(&self, device: &str, now_ms: u64) -> bool {
        let mut devices = self.lock();
        self.make_room(&mut devices, device);
        let (entry, new) = entry(&mut devices, device, now_ms);
        entry.messages += 1;
        new
    }

    /// Records a status message from `device` at `now_ms`.
    pub fn status(&self, device: &str, status: DeviceStatus, now_ms: u64) -> StatusChange {
        let mut devices = self.lock();
        self.make_room(&mut devices, device);
        let (entry, _) = entry(&mut devices, device, now_ms);
        if entry.status == Some(status) {
            return StatusChange::Repeated;
        }
        let from = entry.status.replace(status);
        entry.status_changed_ms = Some(now_ms);
        StatusChange::Changed {
            from,
            device: entry.clone(),
        }
    }

    /// Returns a copy of every device, by id.
    pub fn snapshot(&self) -> BTreeMap<String, Device> {
        self.lock().clone()
    }
}

/// Returns the entry of `device`, created at `now_ms` if it is new, with its
/// last-seen time set to `now_ms`, and whether it was created.
fn entry<'a>(
    devices: &'a mut BTreeMap<String, Device>,
    device: &str,
    now_ms: u64,
) -> (&'a mut Device, bool) {
    let new = !devices.contains_key(device);
    let entry = devices.entry(device.to_owned()).or_insert_with(|| Device {
        first_seen_ms: now_ms,
        ..Device::default()
    });
    entry.last_seen_ms = entry.last_seen_ms.max(now_ms);
    (entry, new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_id_is_second_level() {
        assert_eq!(device_id("devices/bike_001/telemetry"), "bike_001");
        assert_eq!(device_id("devices/bike_001/status"), "bike_001");
        assert_eq!(device_id("sensors/t1"), "t1");
        assert_eq!(device_id("lonely"), "lonely");
        assert_eq!(device_id("devices//telemetry"), "devices");
    }

    #[test]
    fn status_payloads() {
        assert_eq!(DeviceStatus::parse(b"online"), Some(DeviceStatus::Online));
        assert_eq!(
            DeviceStatus::parse(b" OFFLINE\n"),
            Some(DeviceStatus::Offline)
        );
        assert_eq!(DeviceStatus::parse(b"on"), None);
        assert_eq!(DeviceStatus::parse(&[0xff]), None);
    }

    #[test]
    fn fleet_counts_and_times() {
        let fleet = Fleet::default();
        assert!(fleet.message("a", 10));
        assert!(!fleet.message("a", 20));
        let a = &fleet.snapshot()["a"];
        assert_eq!(a.messages, 2);
        assert_eq!(a.first_seen_ms, 10);
        assert_eq!(a.last_seen_ms, 20);
        assert_eq!(a.status, None);
    }

    #[test]
    fn full_registry_forgets_oldest_tenth() {
        let fleet = Fleet::new(20);
        for n in 0..20u64 {
            fleet.message(&format!("d{n:02}"), 100 + n);
        }
        // d00 and d01 are the oldest, but d00 speaks again.
        fleet.message("d00", 200);
        assert_eq!(fleet.evicted.get(), 0);
        assert!(fleet.message("new", 300));
        let devices = fleet.snapshot();
        assert_eq!(devices.len(), 19);
        assert_eq!(fleet.evicted.get(), 2);
        assert!(!devices.contains_key("d01"), "{:?}", devices.keys());
        assert!(!devices.contains_key("d02"), "{:?}", devices.keys());
        assert!(devices.contains_key("d00"));
        assert!(devices.contains_key("new"));
        // A known device never evicts.
        fleet.message("d05", 301);
        assert_eq!(fleet.evicted.get(), 2);
    }

    #[test]
    fn status_changes_once() {
        let fleet = Fleet::default();
        let first = fleet.status("a", DeviceStatus::Online, 5);
        assert!(matches!(first, StatusChange::Changed { from: None, .. }));
        assert_eq!(
            fleet.status("a", DeviceStatus::Online, 6),
            StatusChange::Repeated
        );
        let off = fleet.status("a", DeviceStatus::Offline, 7);
        assert!(matches!(
            off,
            StatusChange::Changed {
                from: Some(DeviceStatus::Online),
                ..
            }
        ));
        let a = &fleet.snapshot()["a"];
        assert_eq!(a.messages, 0, "status messages are not counted");
        assert_eq!(a.status_changed_ms, Some(7));
        assert_eq!(a.last_seen_ms, 7);
    }
}
