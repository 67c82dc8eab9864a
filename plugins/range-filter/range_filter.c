// Range filter, an Eliot plugin written in C.
//
// Drops a message when a numeric field under `data` lies outside the range
// the config sets for it, with a reason that names the field, the value and
// the range; every other message goes on unchanged. A payload that is not a
// JSON object is rejected as invalid.
//
// Config (the plugin's TOML table, as JSON):
//   ranges: a table of field name to [min, max], for example
//           { co2_ppm = [250, 5000], humidity_pct = [0, 100] }
//
// The bindings in plugin.h and plugin.c are generated from wit/world.wit by
// `eliot plugin build --lang c`; this file is all the plugin's own code.

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "plugin.h"

#define MAX_RANGES 64
#define MAX_NAME 128
#define MAX_DEPTH 64

typedef struct {
    char name[MAX_NAME];
    double min;
    double max;
} range_t;

static range_t ranges[MAX_RANGES];
static size_t range_count = 0;

// A small JSON reader: enough to walk objects and arrays and read numbers
// and keys without escapes. Every function advances `c->p` past what it read
// and returns false on malformed input.
typedef struct {
    const char *p;
    const char *end;
} cursor_t;

static void skip_space(cursor_t *c) {
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r')) {
        c->p++;
    }
}

static bool eat(cursor_t *c, char expected) {
    skip_space(c);
    if (c->p < c->end && *c->p == expected) {
        c->p++;
        return true;
    }
    return false;
}

// Reads a string; `start` and `len` give its raw bytes between the quotes.
static bool read_string(cursor_t *c, const char **start, size_t *len) {
    if (!eat(c, '"')) {
        return false;
    }
    *start = c->p;
    while (c->p < c->end && *c->p != '"') {
        if (*c->p == '\\') {
            c->p++;
        }
        c->p++;
    }
    if (c->p >= c->end) {
        return false;
    }
    *len = (size_t)(c->p - *start);
    c->p++;
    return true;
}

static bool read_number(cursor_t *c, double *out) {
    skip_space(c);
    char buffer[64];
    size_t n = 0;
    while (c->p + n < c->end && n < sizeof buffer - 1 && strchr("+-0123456789.eE", c->p[n]) != NULL) {
        buffer[n] = c->p[n];
        n++;
    }
    if (n == 0) {
        return false;
    }
    buffer[n] = '\0';
    char *stop = NULL;
    *out = strtod(buffer, &stop);
    if (stop != buffer + n || !isfinite(*out)) {
        return false;
    }
    c->p += n;
    return true;
}

static bool skip_value(cursor_t *c, int depth);

static bool skip_members(cursor_t *c, char close, bool keyed, int depth) {
    if (eat(c, close)) {
        return true;
    }
    do {
        if (keyed) {
            const char *key;
            size_t len;
            if (!read_string(c, &key, &len) || !eat(c, ':')) {
                return false;
            }
        }
        if (!skip_value(c, depth + 1)) {
            return false;
        }
    } while (eat(c, ','));
    return eat(c, close);
}

static bool skip_value(cursor_t *c, int depth) {
    if (depth > MAX_DEPTH) {
        return false;
    }
    skip_space(c);
    if (c->p >= c->end) {
        return false;
    }
    switch (*c->p) {
    case '{':
        c->p++;
        return skip_members(c, '}', true, depth);
    case '[':
        c->p++;
        return skip_members(c, ']', false, depth);
    case '"': {
        const char *s;
        size_t len;
        return read_string(c, &s, &len);
    }
    default: {
        static const char *const words[] = {"true", "false", "null"};
        for (size_t i = 0; i < 3; i++) {
            size_t len = strlen(words[i]);
            if ((size_t)(c->end - c->p) >= len && memcmp(c->p, words[i], len) == 0) {
                c->p += len;
                return true;
            }
        }
        double ignored;
        return read_number(c, &ignored);
    }
    }
}

static bool key_is(const char *key, size_t len, const char *name) {
    return strlen(name) == len && memcmp(key, name, len) == 0;
}

static void set_error(plugin_string_t *err, const char *text) {
    plugin_string_dup(err, text);
}

// Reads `{"ranges": {"name": [min, max], ...}}` into `ranges`.
static bool read_config(cursor_t *c, char *problem, size_t size) {
    range_count = 0;
    if (!eat(c, '{')) {
        snprintf(problem, size, "the config is not a table");
        return false;
    }
    if (eat(c, '}')) {
        return true;
    }
    do {
        const char *key;
        size_t len;
        if (!read_string(c, &key, &len) || !eat(c, ':')) {
            snprintf(problem, size, "the config is not valid JSON");
            return false;
        }
        if (!key_is(key, len, "ranges")) {
            snprintf(problem, size, "unknown key `%.*s`; expected ranges", (int)len, key);
            return false;
        }
        if (!eat(c, '{')) {
            snprintf(problem, size, "`ranges` must be a table of field name to [min, max]");
            return false;
        }
        if (eat(c, '}')) {
            continue;
        }
        do {
            const char *name;
            size_t name_len;
            double min, max;
            if (!read_string(c, &name, &name_len) || !eat(c, ':')) {
                snprintf(problem, size, "`ranges` must be a table of field name to [min, max]");
                return false;
            }
            if (name_len == 0 || name_len >= MAX_NAME) {
                snprintf(problem, size, "a field name in `ranges` is empty or longer than %d bytes", MAX_NAME - 1);
                return false;
            }
            if (!eat(c, '[') || !read_number(c, &min) || !eat(c, ',') || !read_number(c, &max) || !eat(c, ']')) {
                snprintf(problem, size, "`ranges.%.*s` must be [min, max] with two numbers", (int)name_len, name);
                return false;
            }
            if (min > max) {
                snprintf(problem, size, "`ranges.%.*s` has min %g above max %g", (int)name_len, name, min, max);
                return false;
            }
            if (range_count == MAX_RANGES) {
                snprintf(problem, size, "`ranges` has more than %d fields", MAX_RANGES);
                return false;
            }
            memcpy(ranges[range_count].name, name, name_len);
            ranges[range_count].name[name_len] = '\0';
            ranges[range_count].min = min;
            ranges[range_count].max = max;
            range_count++;
        } while (eat(c, ','));
        if (!eat(c, '}')) {
            snprintf(problem, size, "the config is not valid JSON");
            return false;
        }
    } while (eat(c, ','));
    if (!eat(c, '}')) {
        snprintf(problem, size, "the config is not valid JSON");
        return false;
    }
    return true;
}

static const range_t *range_for(const char *key, size_t len) {
    for (size_t i = 0; i < range_count; i++) {
        if (key_is(key, len, ranges[i].name)) {
            return &ranges[i];
        }
    }
    return NULL;
}

void exports_eliot_plugin_processor_describe(exports_eliot_plugin_processor_plugin_info_t *ret) {
    plugin_string_dup(&ret->name, "range-filter");
    plugin_string_dup(&ret->version, "0.1.0");
}

bool exports_eliot_plugin_processor_init(plugin_string_t *config, plugin_string_t *err) {
    cursor_t c = {(const char *)config->ptr, (const char *)config->ptr + config->len};
    char problem[256];
    bool ok = read_config(&c, problem, sizeof problem);
    plugin_string_free(config);
    if (!ok) {
        set_error(err, problem);
    }
    return ok;
}

bool exports_eliot_plugin_processor_process(
    exports_eliot_plugin_processor_message_t *msg,
    exports_eliot_plugin_processor_outcome_t *ret,
    exports_eliot_plugin_processor_error_t *err) {
    cursor_t c = {(const char *)msg->payload.ptr, (const char *)msg->payload.ptr + msg->payload.len};
    char reason[256];
    bool out_of_range = false;
    bool valid = eat(&c, '{');
    if (valid && !eat(&c, '}')) {
        do {
            const char *key;
            size_t len;
            if (!read_string(&c, &key, &len) || !eat(&c, ':')) {
                valid = false;
                break;
            }
            if (!key_is(key, len, "data")) {
                if (!skip_value(&c, 1)) {
                    valid = false;
                    break;
                }
                continue;
            }
            skip_space(&c);
            if (c.p >= c.end || *c.p != '{') {
                valid = skip_value(&c, 1);
                if (!valid) {
                    break;
                }
                continue;
            }
            c.p++;
            if (eat(&c, '}')) {
                continue;
            }
            do {
                const char *field;
                size_t field_len;
                if (!read_string(&c, &field, &field_len) || !eat(&c, ':')) {
                    valid = false;
                    break;
                }
                const range_t *range = range_for(field, field_len);
                skip_space(&c);
                double value;
                cursor_t probe = c;
                if (range != NULL && read_number(&probe, &value)) {
                    c = probe;
                    if (!out_of_range && (value < range->min || value > range->max)) {
                        out_of_range = true;
                        snprintf(reason, sizeof reason, "%s %g is outside [%g, %g]", range->name, value, range->min, range->max);
                    }
                } else if (!skip_value(&c, 2)) {
                    valid = false;
                    break;
                }
            } while (eat(&c, ','));
            if (!valid || !eat(&c, '}')) {
                valid = false;
                break;
            }
        } while (eat(&c, ','));
        valid = valid && eat(&c, '}');
    }

    if (!valid) {
        eliot_plugin_types_message_free(msg);
        err->kind = ELIOT_PLUGIN_TYPES_ERROR_KIND_INVALID;
        set_error(&err->message, "payload is not a JSON object");
        return false;
    }
    if (out_of_range) {
        plugin_string_t counter;
        plugin_string_set(&counter, "out_of_range");
        eliot_plugin_host_counter_add(&counter, 1);
        eliot_plugin_types_message_free(msg);
        ret->tag = ELIOT_PLUGIN_TYPES_OUTCOME_DROP;
        plugin_string_dup(&ret->val.drop, reason);
        return true;
    }
    // The message goes on as it came; its buffers now belong to the result,
    // which the generated code frees after the host copied it.
    ret->tag = ELIOT_PLUGIN_TYPES_OUTCOME_FORWARD;
    ret->val.forward = *msg;
    return true;
}
