// Node-RED function node doing the work of plugins/sanity-filter with its
// default ranges and the flow_lps to flow_m3h conversion of the benchmark
// configuration: out-of-range readings are dropped.
const RANGES = {
    latitude: [-90, 90],
    longitude: [-180, 180],
    altitude_m: [-500, 10000],
    temperature_c: [-90, 70],
    humidity_pct: [0, 100],
    light_lux: [0, 200000],
    co2_ppm: [0, 100000],
    flow_lps: [0, 100000],
};
let payload;
try {
    payload = JSON.parse(msg.payload);
} catch (e) {
    return null;
}
const data = payload.data;
if (typeof data !== "object" || data === null || Array.isArray(data)) {
    return null;
}
for (const [field, [min, max]] of Object.entries(RANGES)) {
    const value = data[field];
    if (value === undefined) {
        continue;
    }
    if (typeof value !== "number" || value < min || value > max) {
        return null;
    }
}
if (typeof data.flow_lps === "number") {
    data.flow_m3h = Math.round(data.flow_lps * 3.6 * 1e6) / 1e6;
    delete data.flow_lps;
}
// The line Eliot's file sink writes: the pipeline, the topic, the receive
// time and the payload.
msg.payload = JSON.stringify({
    pipeline: "telemetry",
    topic: msg.topic,
    received_at: payload.received_at,
    payload: payload,
});
return msg;
