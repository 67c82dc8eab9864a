// Node-RED function node doing the work of plugins/validate-format: a
// message that is not a JSON object with a device id, an RFC 3339
// timestamp, a sensor type and a data object is dropped.
let payload;
try {
    payload = JSON.parse(msg.payload);
} catch (e) {
    return null;
}
const nonEmpty = (value) => typeof value === "string" && value !== "";
const isObject = (value) => typeof value === "object" && value !== null && !Array.isArray(value);
if (!isObject(payload) || !nonEmpty(payload.device_id) || !nonEmpty(payload.sensor_type)) {
    return null;
}
if (typeof payload.timestamp !== "string" || Number.isNaN(Date.parse(payload.timestamp))) {
    return null;
}
if (!isObject(payload.data)) {
    return null;
}
return msg;
