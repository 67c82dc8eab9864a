// Node-RED function node doing the work of plugins/enrich: the device id
// from the topic when the payload has none, the receive time, and the
// timestamp normalised to UTC.
let payload;
try {
    payload = JSON.parse(msg.payload);
} catch (e) {
    return msg;
}
if (typeof payload !== "object" || payload === null || Array.isArray(payload)) {
    return msg;
}
if (typeof payload.device_id !== "string" || payload.device_id === "") {
    const match = /^devices\/([^/]+)\/telemetry$/.exec(msg.topic);
    if (match) {
        payload.device_id = match[1];
    }
}
payload.received_at = new Date().toISOString();
if (typeof payload.timestamp === "string") {
    const parsed = new Date(payload.timestamp);
    if (!Number.isNaN(parsed.getTime())) {
        payload.timestamp = parsed.toISOString();
    }
}
msg.payload = JSON.stringify(payload);
return msg;
