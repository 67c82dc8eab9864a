//! The dead-letter file: every message that a stage rejected or failed on,
//! with the stage and the reason, one JSON object per line.

use std::path::Path;
use std::sync::Mutex;

use base64::Engine as _;

use crate::sink::{FileSink, SinkError};
use crate::wasm::{Message, Qos};

// NOTE: a plain file is not a queryable, replayable store; it holds every
// field needed to replay a message, but nothing reads it back yet.

/// Why a message was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The plugin returned an `invalid` error.
    Invalid,
    /// The plugin returned `transient` errors until retries ran out.
    Transient,
    /// The call exceeded the plugin's time budget.
    Timeout,
    /// The plugin trapped (panic, out-of-bounds access, memory denied).
    Trap,
    /// A sink could not take the message, for example a topic template
    /// without a value.
    Sink,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Invalid => "invalid",
            Self::Transient => "transient",
            Self::Timeout => "timeout",
            Self::Trap => "trap",
            Self::Sink => "sink",
        }
    }
}

/// One dead letter: the original message and where and why it failed.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub pipeline: String,
    /// Stage (or `sink:NAME`) that failed.
    pub stage: String,
    pub kind: FailureKind,
    pub reason: String,
    pub message: Message,
}

/// The append-only dead-letter file, shared by every pipeline.
pub struct DeadLetterFile {
    file: Mutex<FileSink>,
}

impl DeadLetterFile {
    /// Opens `path` for appending.
    ///
    /// # Errors
    ///
    /// Returns the I/O error with the path.
    pub fn open(path: &Path) -> Result<Self, SinkError> {
        Ok(Self { file: Mutex::new(FileSink::open(path)?) })
    }

    pub fn path(&self) -> std::path::PathBuf {
        self.lock().path().to_owned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FileSink> {
        self.file.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends a batch of dead letters and flushes it.
    ///
    /// # Errors
    ///
    /// Returns the I/O error; the caller must not acknowledge the messages.
    pub fn append(&self, letters: &[&DeadLetter]) -> Result<(), SinkError> {
        let mut file = self.lock();
        for letter in letters {
            file.write_json(&letter_json(letter))?;
        }
        file.flush()
    }
}

fn letter_json(letter: &DeadLetter) -> serde_json::Value {
    let message = &letter.message;
    let mut object = serde_json::json!({
        "time": crate::clock::rfc3339_ms(crate::clock::now_ms()),
        "pipeline": letter.pipeline,
        "stage": letter.stage,
        "kind": letter.kind.as_str(),
        "reason": letter.reason,
        "topic": message.topic,
        "qos": match message.qos {
            Qos::AtMostOnce => 0,
            Qos::AtLeastOnce => 1,
            Qos::ExactlyOnce => 2,
        },
        "retain": message.retain,
        "received_at": crate::clock::rfc3339_ms(message.received_at_ms),
        "headers": message.headers,
        "payload_base64": base64::engine::general_purpose::STANDARD.encode(&message.payload),
    });
    // The text form is for people reading the file; the base64 form is the
    // exact original bytes.
    if let Ok(text) = std::str::from_utf8(&message.payload) {
        object["payload_text"] = text.into();
    }
    object
}
