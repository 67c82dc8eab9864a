"""Rolling-window anomaly check, an Eliot plugin written in Python.

For every numeric field under `data` it keeps the last `window` values per
device and flags a value whose z-score against them exceeds `threshold`.
A flagged message goes on with an `anomalies` list in its payload and an
`anomaly` header naming the fields; every other message goes on unchanged.
A payload that is not a JSON object is rejected as invalid.

Config (the plugin's TOML table, as JSON):
- `window` (integer, 3 to 10000, default 24): values kept per device and field.
- `threshold` (number above 0, default 3.0): z-score that counts as anomalous.
- `min_samples` (integer, 2 to window, default 8): values needed before a
  field is judged at all.
- `fields` (list of strings, default all): the fields to check.
"""

import json
import math
from collections import deque

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import host, log
from wit_world.imports import types

NAME = "rolling-anomaly"
VERSION = "0.1.0"


def _settings(config):
    """Returns the checked settings from the config object, or raises
    ValueError naming the key and the expected form."""
    known = {"window", "threshold", "min_samples", "fields"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"unknown key `{unknown[0]}`; expected one of window, threshold, min_samples, fields")
    window = config.get("window", 24)
    if not isinstance(window, int) or isinstance(window, bool) or not 3 <= window <= 10000:
        raise ValueError(f"`window` is {window!r}; expected an integer from 3 to 10000")
    threshold = config.get("threshold", 3.0)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
        raise ValueError(f"`threshold` is {threshold!r}; expected a number above 0")
    min_samples = config.get("min_samples", min(8, window))
    if not isinstance(min_samples, int) or isinstance(min_samples, bool) or not 2 <= min_samples <= window:
        raise ValueError(f"`min_samples` is {min_samples!r}; expected an integer from 2 to `window` ({window})")
    fields = config.get("fields")
    if fields is not None and (not isinstance(fields, list) or not all(isinstance(f, str) for f in fields)):
        raise ValueError(f"`fields` is {fields!r}; expected a list of field names")
    return window, float(threshold), min_samples, fields


class Processor(exports.Processor):
    def __init__(self):
        self.window, self.threshold, self.min_samples, self.fields = _settings({})
        # (device, field) -> the last `window` values, oldest first.
        self.history = {}

    def describe(self):
        return types.PluginInfo(name=NAME, version=VERSION)

    def init(self, config):
        try:
            parsed = json.loads(config)
            if not isinstance(parsed, dict):
                raise ValueError("the config is not a table")
            self.window, self.threshold, self.min_samples, self.fields = _settings(parsed)
        except ValueError as error:
            raise Err(str(error))
        self.history = {}

    def process(self, msg):
        try:
            payload = json.loads(bytes(msg.payload))
        except ValueError as error:
            raise Err(types.Error(kind=types.ErrorKind.INVALID, message=f"payload is not JSON: {error}"))
        if not isinstance(payload, dict):
            raise Err(types.Error(kind=types.ErrorKind.INVALID, message="payload is not a JSON object"))
        data = payload.get("data")
        if not isinstance(data, dict):
            return types.Outcome_Forward(msg)
        device = payload.get("device_id") or msg.topic

        anomalies = []
        for field, value in data.items():
            if self.fields is not None and field not in self.fields:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            past = self.history.setdefault((device, field), deque(maxlen=self.window))
            if len(past) >= self.min_samples:
                mean = sum(past) / len(past)
                spread = math.sqrt(sum((v - mean) ** 2 for v in past) / len(past))
                if spread > 0:
                    z = (value - mean) / spread
                    if abs(z) > self.threshold:
                        anomalies.append({"field": field, "value": value, "mean": round(mean, 6), "z": round(z, 3)})
            past.append(value)

        if not anomalies:
            return types.Outcome_Forward(msg)
        payload["anomalies"] = anomalies
        names = ",".join(a["field"] for a in anomalies)
        host.counter_add("anomalies", len(anomalies))
        log.write(log.Level.INFO, "anomaly", [("device", str(device)), ("fields", names)])
        msg.payload = json.dumps(payload, separators=(",", ":")).encode()
        msg.headers.append(("anomaly", names))
        return types.Outcome_Forward(msg)
