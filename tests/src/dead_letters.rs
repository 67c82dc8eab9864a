//! Reads the host's dead-letter store, so that tests check dead letters
//! without depending on how the host stores them.

use std::path::Path;

use eliot::deadletter::{DeadLetterError, DeadLetterStore, ListFilter};
use serde_json::Value;

/// Returns every dead letter in the store at `path` (the config's
/// `dead_letters.path`), oldest first. Each is the JSON object that
/// `eliot dead-letters list --json` prints, with `id`, `pipeline`, `stage`,
/// `kind`, `reason`, `topic`, `payload_base64`, `payload_text` (for a UTF-8
/// payload) and the other fields listed in the README. A store that does
/// not exist yet has no dead letters.
///
/// The store is an SQLite database, which the host may write to at the same
/// time; a dead letter is read only once its batch is committed.
///
/// # Panics
///
/// Panics when the store cannot be opened or read.
pub fn read_all(path: impl AsRef<Path>) -> Vec<Value> {
    let path = path.as_ref();
    let store = match DeadLetterStore::open_existing(path) {
        Ok(store) => store,
        Err(DeadLetterError::NotFound { .. }) => return Vec::new(),
        Err(err) => panic!("failed to open the dead-letter store: {err}"),
    };
    let letters = store
        .list(&ListFilter::default())
        .unwrap_or_else(|err| panic!("failed to read the dead-letter store: {err}"));
    letters.iter().map(|letter| letter.to_json()).collect()
}
