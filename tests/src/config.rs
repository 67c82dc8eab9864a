//! Host configurations for the tests.

use std::path::{Path, PathBuf};

/// The `[plugins.*]` tables of the three example plugins, as the shipped
/// configuration has them.
pub const EXAMPLE_PLUGIN_TABLES: &str = r#"
[plugins.enrich]
file = "enrich.wasm"

[plugins.validate-format]
file = "validate_format.wasm"

[plugins.sanity-filter]
file = "sanity_filter.wasm"
config = { convert = { flow_lps = "flow_m3h" } }
"#;

/// Returns a configuration like the shipped one: the three example plugins in the
/// `telemetry` pipeline, a file sink at `out/processed.jsonl` and the dead
/// letters under `out/`, all relative to the folder of the file. `extra` is
/// appended as TOML, for example more sinks or pipeline settings.
pub fn example_config(broker: &str, plugin_dir: &Path, client_id: &str, sinks: &str, extra: &str) -> String {
    format!(
        r#"
[mqtt]
broker = "{broker}"
client_id = "{client_id}"
keep_alive_secs = 5

[runtime]
plugin_dir = "{plugins}"
cache_dir = "cache"

[dead_letters]
path = "out/dead-letters.sqlite"

{EXAMPLE_PLUGIN_TABLES}
[pipelines.telemetry]
topics = ["devices/+/telemetry"]
stages = ["enrich", "validate-format", "sanity-filter"]
sinks = [{sinks}]

[sinks.file]
type = "file"
path = "out/processed.jsonl"
{extra}
"#,
        plugins = plugin_dir.display()
    )
}

/// Writes [`example_config`] with only the file sink to `dir/eliot.toml`.
pub fn write_example_config(dir: &Path, broker: &str, plugin_dir: &Path, client_id: &str) -> PathBuf {
    let path = dir.join("eliot.toml");
    std::fs::write(&path, example_config(broker, plugin_dir, client_id, "\"file\"", "")).expect("write eliot.toml");
    path
}
