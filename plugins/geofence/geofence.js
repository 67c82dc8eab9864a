// Geofence check, an Eliot plugin written in JavaScript.
//
// For a message whose payload has numeric `data.latitude` and
// `data.longitude`, it adds `data.distance_m` (great-circle distance to the
// configured centre, in metres) and `data.inside` (within `radius_m` or
// not). When a device crosses the fence it also adds a `geofence` header,
// `entered` or `left`, so that later stages and sinks can alert on it.
// Messages without a position pass unchanged; a payload that is not a JSON
// object is rejected as invalid.
//
// Config (the plugin's TOML table, as JSON):
// - `latitude`, `longitude` (degrees, required): the centre.
// - `radius_m` (metres above 0, required): the fence radius.

import { write } from 'eliot:plugin/log@0.1.0';
import { counterAdd } from 'eliot:plugin/host@0.1.0';

const NAME = 'geofence';
const VERSION = '0.1.0';
const EARTH_RADIUS_M = 6371008.8;

let fence = null;
// Device -> whether its last position was inside.
const lastInside = new Map();

function number(config, key, check, expected) {
  const value = config[key];
  if (typeof value !== 'number' || !Number.isFinite(value) || !check(value)) {
    throw `\`${key}\` is ${JSON.stringify(value)}; expected ${expected}`;
  }
  return value;
}

function distanceM(lat1, lon1, lat2, lon2) {
  const rad = Math.PI / 180;
  const dLat = (lat2 - lat1) * rad;
  const dLon = (lon2 - lon1) * rad;
  const a =
    Math.sin(dLat / 2) ** 2 +
    Math.cos(lat1 * rad) * Math.cos(lat2 * rad) * Math.sin(dLon / 2) ** 2;
  return 2 * EARTH_RADIUS_M * Math.asin(Math.min(1, Math.sqrt(a)));
}

export const processor = {
  describe() {
    return { name: NAME, version: VERSION };
  },

  init(config) {
    let parsed;
    try {
      parsed = JSON.parse(config);
    } catch (error) {
      throw `the config is not JSON: ${error}`;
    }
    if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) {
      throw 'the config is not a table';
    }
    for (const key of Object.keys(parsed)) {
      if (!['latitude', 'longitude', 'radius_m'].includes(key)) {
        throw `unknown key \`${key}\`; expected latitude, longitude, radius_m`;
      }
    }
    fence = {
      latitude: number(parsed, 'latitude', (v) => v >= -90 && v <= 90, 'degrees from -90 to 90'),
      longitude: number(parsed, 'longitude', (v) => v >= -180 && v <= 180, 'degrees from -180 to 180'),
      radiusM: number(parsed, 'radius_m', (v) => v > 0, 'metres above 0'),
    };
    lastInside.clear();
  },

  process(msg) {
    let payload;
    try {
      payload = JSON.parse(new TextDecoder().decode(msg.payload));
    } catch (error) {
      throw { kind: 'invalid', message: `payload is not JSON: ${error}` };
    }
    if (payload === null || typeof payload !== 'object' || Array.isArray(payload)) {
      throw { kind: 'invalid', message: 'payload is not a JSON object' };
    }
    const data = payload.data;
    if (
      fence === null ||
      data === null ||
      typeof data !== 'object' ||
      typeof data.latitude !== 'number' ||
      typeof data.longitude !== 'number'
    ) {
      return { tag: 'forward', val: msg };
    }

    const distance = distanceM(fence.latitude, fence.longitude, data.latitude, data.longitude);
    const inside = distance <= fence.radiusM;
    data.distance_m = Math.round(distance * 10) / 10;
    data.inside = inside;
    const device = String(payload.device_id ?? msg.topic);
    const before = lastInside.get(device);
    lastInside.set(device, inside);
    const headers = msg.headers.slice();
    if (before !== undefined && before !== inside) {
      const crossing = inside ? 'entered' : 'left';
      headers.push(['geofence', crossing]);
      counterAdd(crossing, 1n);
      write('info', `device ${crossing} the fence`, [['device', device], ['distance_m', String(data.distance_m)]]);
    }
    return {
      tag: 'forward',
      val: { ...msg, payload: new TextEncoder().encode(JSON.stringify(payload)), headers },
    };
  },
};
