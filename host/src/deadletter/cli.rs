//! `eliot dead-letters list|show|replay|purge`: reads and changes the
//! dead-letter store that a configuration file names.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use base64::Engine as _;
use clap::{Args, Subcommand};

use super::replay::{self, LetterOutcome, ReplayOptions, Selection};
use super::{DeadLetterError, DeadLetterStore, FailureKind, ListFilter, StoredDeadLetter};

/// Characters of the reason shown in the `list` table.
const REASON_WIDTH: usize = 60;

/// The `dead-letters` subcommands.
#[derive(Debug, Subcommand)]
pub enum DeadLetterCommand {
    /// List dead letters, oldest first, as a table or as JSON lines.
    List {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        filter: FilterArgs,
        /// Show at most this many dead letters, 1 or more.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..))]
        limit: u64,
        /// Show only dead letters with a greater id; the table's last line
        /// gives the value for the next page.
        #[arg(long, value_name = "ID")]
        after_id: Option<i64>,
        /// Print one JSON object per line with every field, in place of the
        /// table.
        #[arg(long)]
        json: bool,
    },
    /// Show every field of one dead letter, with its payload as text when
    /// it is UTF-8 and as base64 otherwise.
    Show {
        #[command(flatten)]
        config: ConfigArg,
        /// Id of the dead letter, as `list` shows it.
        id: i64,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Send dead letters through their pipeline's current stages and sinks
    /// again.
    ///
    /// Letters that pass, and letters that a stage drops, are deleted.
    /// Letters that fail again stay, with the new reason and a higher replay
    /// count.
    Replay {
        #[command(flatten)]
        config: ConfigArg,
        /// Ids of the dead letters to replay.
        #[arg(value_name = "ID")]
        ids: Vec<i64>,
        #[command(flatten)]
        filter: FilterArgs,
        /// Replay every dead letter in the store.
        #[arg(long)]
        all: bool,
        /// Broker the MQTT sinks publish to, HOST:PORT; by default the one in
        /// the config. Needed for the embedded broker on port 0: give the
        /// address the running host logged.
        #[arg(long, value_name = "HOST:PORT")]
        broker: Option<String>,
        /// Deliver to the file sinks only, and leave out the MQTT sinks.
        #[arg(long)]
        skip_mqtt_sinks: bool,
    },
    /// Delete dead letters for good, and print how many were deleted.
    Purge {
        #[command(flatten)]
        config: ConfigArg,
        /// Ids of the dead letters to delete.
        #[arg(value_name = "ID")]
        ids: Vec<i64>,
        #[command(flatten)]
        filter: FilterArgs,
        /// Delete every dead letter in the store.
        #[arg(long)]
        all: bool,
    },
}

/// The configuration file whose `dead_letters.path` names the store.
#[derive(Debug, Args)]
pub struct ConfigArg {
    /// Configuration file.
    #[arg(long, short, default_value = "config/eliot.toml", env = "ELIOT_CONFIG")]
    pub config: PathBuf,
}

/// Filters that select dead letters; every one given must match.
#[derive(Debug, Default, Args)]
pub struct FilterArgs {
    /// Only dead letters of this pipeline.
    #[arg(long, value_parser = parse_non_empty)]
    pub pipeline: Option<String>,
    /// Only dead letters from this stage (plugin name, or sink:NAME for a sink).
    #[arg(long, value_parser = parse_non_empty)]
    pub stage: Option<String>,
    /// Only dead letters of this kind: invalid, transient, timeout, trap,
    /// sink, circuit-open, undecodable, too-large or host-panic.
    #[arg(long, value_parser = parse_kind)]
    pub kind: Option<FailureKind>,
    /// Only dead letters whose topic starts with this text.
    #[arg(long, value_parser = parse_non_empty)]
    pub topic_prefix: Option<String>,
}

impl FilterArgs {
    fn into_filter(self) -> ListFilter {
        ListFilter {
            pipeline: self.pipeline,
            stage: self.stage,
            kind: self.kind,
            topic_prefix: self.topic_prefix,
            limit: None,
            after_id: None,
        }
    }
}

fn parse_kind(text: &str) -> Result<FailureKind, String> {
    text.parse()
}

/// Rejects an empty filter value: an empty topic prefix would match every
/// dead letter, which `purge` must only do with `--all`.
fn parse_non_empty(text: &str) -> Result<String, String> {
    if text.is_empty() {
        Err("the value is empty; give a non-empty value or leave the filter out".to_owned())
    } else {
        Ok(text.to_owned())
    }
}

/// Runs one subcommand and prints its output to standard output.
///
/// # Errors
///
/// Fails when the config or store cannot be read, the selection is missing
/// or contradictory, or a replay cannot deliver.
pub async fn execute(command: DeadLetterCommand) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout();
    execute_to(command, &mut stdout).await
}

/// Runs one subcommand and writes its output to `out`.
///
/// # Errors
///
/// See [`execute`].
pub async fn execute_to(command: DeadLetterCommand, out: &mut dyn Write) -> anyhow::Result<()> {
    match command {
        DeadLetterCommand::List {
            config,
            filter,
            limit,
            after_id,
            json,
        } => {
            let store = open_store(&config.config)?;
            let limit = usize::try_from(limit).unwrap_or(usize::MAX);
            let filter = ListFilter {
                limit: Some(limit),
                after_id,
                ..filter.into_filter()
            };
            list(&store, &filter, json, out)
        }
        DeadLetterCommand::Show { config, id, json } => {
            let store = open_store(&config.config)?;
            let letter = store.get(id)?.with_context(|| {
                format!("dead letter {id} not found in {}", store.path().display())
            })?;
            if json {
                writeln!(out, "{}", letter.to_json())?;
            } else {
                show(&letter, out)?;
            }
            Ok(())
        }
        DeadLetterCommand::Replay {
            config,
            ids,
            filter,
            all,
            broker,
            skip_mqtt_sinks,
        } => {
            let selection = selection("replay", ids, filter, all)?;
            let config = crate::cli::load_config(&config.config)?;
            let store = open_existing(&config.dead_letter_path, &config.file)?;
            let options = ReplayOptions {
                broker,
                skip_mqtt_sinks,
            };
            let mut write_error = None;
            let summary = replay::replay(&config, &store, &selection, &options, |id, outcome| {
                if let Err(e) = writeln!(out, "{}", outcome_line(id, outcome)) {
                    write_error.get_or_insert(e);
                }
            })
            .await?;
            if let Some(e) = write_error {
                return Err(e.into());
            }
            writeln!(
                out,
                "replay finished: {} delivered, {} dropped, {} failed again, {} skipped; delivered and dropped \
                 dead letters were deleted from {}",
                summary.delivered,
                summary.dropped,
                summary.failed_again,
                summary.skipped,
                store.path().display()
            )?;
            Ok(())
        }
        DeadLetterCommand::Purge {
            config,
            ids,
            filter,
            all,
        } => {
            let selection = selection("purge", ids, filter, all)?;
            let store = open_store(&config.config)?;
            let purged = match selection {
                Selection::Ids(ids) => {
                    let missing: Vec<String> =
                        store.missing(&ids)?.iter().map(i64::to_string).collect();
                    if !missing.is_empty() {
                        bail!(
                            "dead letters not found in {}: {}; nothing was purged",
                            store.path().display(),
                            missing.join(", ")
                        );
                    }
                    store.delete(&ids)?
                }
                Selection::Filter(filter) => store.purge(&filter)?,
            };
            writeln!(
                out,
                "purged {purged} dead letter{} from {}",
                plural(purged),
                store.path().display()
            )?;
            Ok(())
        }
    }
}

/// Checks that a replay or purge selects something, and in one way only.
/// Repeated ids count once.
fn selection(
    command: &str,
    ids: Vec<i64>,
    filter: FilterArgs,
    all: bool,
) -> anyhow::Result<Selection> {
    let filter = filter.into_filter();
    let has_filter = !filter.matches_everything();
    if all && (has_filter || !ids.is_empty()) {
        bail!("--all selects every dead letter; remove it, or remove the ids and filters");
    }
    if has_filter && !ids.is_empty() {
        bail!("give either dead-letter ids or filters, not both");
    }
    if all || has_filter {
        return Ok(Selection::Filter(filter));
    }
    if ids.is_empty() {
        bail!(
            "{command} needs a selection: give dead-letter ids, a filter (--pipeline, --stage, --kind, \
             --topic-prefix) or --all"
        );
    }
    Ok(Selection::ids(ids))
}

/// Opens the store that `config_file` names, reading only the key
/// `dead_letters.path`, so that listing works while plugins are not built.
fn open_store(config_file: &Path) -> anyhow::Result<DeadLetterStore> {
    let path = store_path(config_file)?;
    open_existing(&path, config_file)
}

fn open_existing(path: &Path, config_file: &Path) -> anyhow::Result<DeadLetterStore> {
    match DeadLetterStore::open_existing(path) {
        Ok(store) => Ok(store),
        Err(DeadLetterError::NotFound { path }) => bail!(
            "no dead-letter store at {} (dead_letters.path in {}); the host creates it when it starts, so \
             check the path or pass --config",
            path.display(),
            config_file.display()
        ),
        Err(e) => Err(e.into()),
    }
}

/// Reads `dead_letters.path` from the configuration layers (the overlay
/// that `ELIOT_ENV` selects may move the store) and resolves it against the
/// base file's folder, as [`crate::config::Config::load`] does. The rest of the
/// configuration is not validated, so that a store stays readable while the
/// plugins are missing.
fn store_path(config_file: &Path) -> anyhow::Result<PathBuf> {
    let text = std::fs::read_to_string(config_file)
        .with_context(|| format!("cannot read {}; pass --config FILE", config_file.display()))?;
    let table = crate::layers::apply(config_file, &text, &crate::layers::Layers::from_process())
        .map_err(|errors| anyhow::anyhow!("{}", crate::config::ConfigErrors(errors)))?
        .table;
    let Some(path) = table
        .get("dead_letters")
        .and_then(|d| d.get("path"))
        .and_then(|p| p.as_str())
    else {
        bail!(
            "{}: key `dead_letters.path` is missing or not a string; add it, for example \
             [dead_letters] path = \"dead-letters.sqlite\"",
            config_file.display()
        );
    };
    let base = config_file.parent().map(Path::to_owned).unwrap_or_default();
    let base = std::path::absolute(&base).unwrap_or(base);
    Ok(base.join(path))
}

fn list(
    store: &DeadLetterStore,
    filter: &ListFilter,
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let letters = store.list(filter)?;
    if json {
        for letter in &letters {
            writeln!(out, "{}", letter.to_json())?;
        }
        return Ok(());
    }
    let Some(last) = letters.last() else {
        writeln!(out, "no dead letters match")?;
        return Ok(());
    };

    let header = [
        "ID", "STORED", "PIPELINE", "STAGE", "KIND", "TOPIC", "REASON",
    ]
    .map(str::to_owned);
    let rows: Vec<[String; 7]> = letters
        .iter()
        .map(|letter| {
            [
                letter.id.to_string(),
                crate::clock::rfc3339_ms(letter.stored_at_ms),
                one_line(&letter.pipeline),
                one_line(&letter.stage),
                letter.kind.as_str().to_owned(),
                one_line(&topic_text(letter)),
                truncate(&one_line(&letter.reason), REASON_WIDTH),
            ]
        })
        .collect();
    let mut widths = header.clone().map(|cell| cell.chars().count());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        writeln!(out, "{}", cells.join("  ").trim_end())?;
    }

    let matching = store.count(&ListFilter {
        limit: None,
        ..filter.clone()
    })?;
    if matching > letters.len() as u64 {
        writeln!(
            out,
            "{} of {matching} matching dead letters shown; for the next page pass --after-id {}",
            letters.len(),
            last.id
        )?;
    } else {
        writeln!(
            out,
            "{} dead letter{}",
            letters.len(),
            plural(letters.len())
        )?;
    }
    Ok(())
}

fn show(letter: &StoredDeadLetter, out: &mut dyn Write) -> anyhow::Result<()> {
    let base64 = &base64::engine::general_purpose::STANDARD;
    let topic = match &letter.topic {
        Some(topic) => topic.clone(),
        None => format!(
            "(not valid UTF-8; base64) {}",
            base64.encode(&letter.topic_bytes)
        ),
    };
    let last_replayed = letter
        .last_replayed_at_ms
        .map_or_else(|| "never".to_owned(), crate::clock::rfc3339_ms);
    let fields = [
        ("id", letter.id.to_string()),
        ("stored at", crate::clock::rfc3339_ms(letter.stored_at_ms)),
        ("pipeline", letter.pipeline.clone()),
        ("stage", letter.stage.clone()),
        ("kind", letter.kind.as_str().to_owned()),
        ("reason", letter.reason.clone()),
        ("topic", topic),
        ("qos", super::store::qos_number(letter.qos).to_string()),
        ("retain", letter.retain.to_string()),
        (
            "received at",
            crate::clock::rfc3339_ms(letter.received_at_ms),
        ),
        ("replay count", letter.replay_count.to_string()),
        ("last replayed", last_replayed),
    ];
    for (name, value) in fields {
        // Continuation lines of a multi-line value (a reason, say) line up
        // under its first line.
        let value = value.replace('\n', &format!("\n{:15}", ""));
        writeln!(out, "{:<14} {value}", format!("{name}:"))?;
    }
    if letter.headers.is_empty() {
        writeln!(out, "{:<14} (none)", "headers:")?;
    } else {
        writeln!(out, "headers:")?;
        for (name, value) in &letter.headers {
            writeln!(out, "  {name}: {value}")?;
        }
    }
    let size = letter.payload.len();
    match std::str::from_utf8(&letter.payload) {
        Ok(text) => writeln!(
            out,
            "payload ({size} byte{}, UTF-8 text):\n{text}",
            plural(size)
        )?,
        Err(_) => writeln!(
            out,
            "payload ({size} byte{}, not valid UTF-8, base64):\n{}",
            plural(size),
            base64.encode(&letter.payload)
        )?,
    }
    Ok(())
}

fn outcome_line(id: i64, outcome: &LetterOutcome) -> String {
    match outcome {
        LetterOutcome::Delivered { records } => {
            format!("{id}: delivered ({records} record{})", plural(*records))
        }
        LetterOutcome::Dropped { stage, reason } => {
            format!("{id}: dropped by {stage}: {}", one_line(reason))
        }
        LetterOutcome::FailedAgain {
            stage,
            kind,
            reason,
            replay_count,
        } => format!(
            "{id}: failed again at {stage} ({kind}), replay count {replay_count}: {}",
            one_line(reason)
        ),
        LetterOutcome::Skipped { reason } => format!("{id}: skipped: {reason}"),
    }
}

/// Returns the topic as text, with replacement characters where it is not
/// valid UTF-8.
fn topic_text(letter: &StoredDeadLetter) -> String {
    match &letter.topic {
        Some(topic) => topic.clone(),
        None => String::from_utf8_lossy(&letter.topic_bytes).into_owned(),
    }
}

/// Replaces control characters (line breaks, tabs) with spaces, so that one
/// value stays on one line of the table.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn truncate(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(width - 1).collect();
    cut.push('…');
    cut
}

fn plural<N: TryInto<u64>>(count: N) -> &'static str {
    if count.try_into().ok() == Some(1) {
        ""
    } else {
        "s"
    }
}

#[cfg(test)]
mod tests;
