//! Plain Rust mirrors of the WIT types, usable with or without Wasm.

/// MQTT quality of service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Qos {
    AtMostOnce,
    AtLeastOnce,
    ExactlyOnce,
}

/// One message moving through a pipeline; see `message` in the WIT package.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: Qos,
    pub retain: bool,
    /// Receive time in milliseconds since the Unix epoch (UTC).
    pub received_at_ms: u64,
    /// MQTT 5 user properties and metadata from earlier stages, in order.
    pub headers: Vec<(String, String)>,
}

impl Message {
    /// Returns the value of the first header named `key`.
    pub fn header(&self, key: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Replaces every header named `key` with one header of that name.
    pub fn set_header(&mut self, key: &str, value: impl Into<String>) {
        self.headers.retain(|(k, _)| k != key);
        self.headers.push((key.to_owned(), value.into()));
    }
}

/// What a processor did with a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Pass one message on to the next stage.
    Forward(Message),
    /// Pass several messages on, each through the remaining stages.
    FanOut(Vec<Message>),
    /// Consume the message on purpose, with a reason for the logs.
    Drop(String),
}

/// How the host treats a failure; see `error-kind` in the WIT package.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Never retried; the message goes to the dead-letter store.
    Invalid,
    /// Retried with backoff, then dead-lettered.
    Transient,
}

/// A processing failure with its kind and reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginError {
    pub kind: ErrorKind,
    pub message: String,
}

impl PluginError {
    /// A failure caused by the message itself.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self { kind: ErrorKind::Invalid, message: message.into() }
    }

    /// A failure that may pass on retry.
    pub fn transient(message: impl Into<String>) -> Self {
        Self { kind: ErrorKind::Transient, message: message.into() }
    }
}

impl std::fmt::Display for PluginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            ErrorKind::Invalid => "invalid",
            ErrorKind::Transient => "transient",
        };
        write!(f, "{kind}: {}", self.message)
    }
}

impl std::error::Error for PluginError {}
