//! The glue between wit-bindgen's generated exports and [`Processor`].
//! Compiled only for `wasm32`; plugin authors use [`crate::export_processor!`].

use std::cell::RefCell;

use crate::{ErrorKind, Message, Outcome, PluginError, Processor, Qos};

pub mod bindings {
    wit_bindgen::generate!({
        world: "plugin",
        path: "../wit",
        pub_export_macro: true,
        default_bindings_module: "eliot_sdk::guest::bindings",
    });
}

use bindings::eliot::plugin::{log as wit_log, types as wit};

thread_local! {
    // A component instance is single-threaded, and the host calls `init`
    // before any `process`, so one slot per instance is enough.
    static INSTANCE: RefCell<Option<Box<dyn std::any::Any>>> = const { RefCell::new(None) };
}

pub fn describe<P: Processor>() -> wit::PluginInfo {
    wit::PluginInfo { name: P::NAME.to_owned(), version: P::VERSION.to_owned() }
}

pub fn init<P: Processor>(config: String) -> Result<(), String> {
    let value: serde_json::Value = serde_json::from_str(&config)
        .map_err(|e| format!("the host passed config that is not JSON: {e}"))?;
    let processor = P::new(value)?;
    INSTANCE.with(|slot| *slot.borrow_mut() = Some(Box::new(processor)));
    Ok(())
}

pub fn process<P: Processor>(msg: wit::Message) -> Result<wit::Outcome, wit::Error> {
    INSTANCE.with(|slot| {
        let mut slot = slot.borrow_mut();
        let processor = slot.as_mut().and_then(|p| p.downcast_mut::<P>()).ok_or_else(|| wit::Error {
            kind: wit::ErrorKind::Transient,
            message: "process called before init".to_owned(),
        })?;
        processor.process(from_wit(msg)).map(outcome_to_wit).map_err(error_to_wit)
    })
}

fn from_wit(msg: wit::Message) -> Message {
    Message {
        topic: msg.topic,
        payload: msg.payload,
        qos: match msg.qos {
            wit::Qos::AtMostOnce => Qos::AtMostOnce,
            wit::Qos::AtLeastOnce => Qos::AtLeastOnce,
            wit::Qos::ExactlyOnce => Qos::ExactlyOnce,
        },
        retain: msg.retain,
        received_at_ms: msg.received_at_ms,
        headers: msg.headers,
    }
}

fn to_wit(msg: Message) -> wit::Message {
    wit::Message {
        topic: msg.topic,
        payload: msg.payload,
        qos: match msg.qos {
            Qos::AtMostOnce => wit::Qos::AtMostOnce,
            Qos::AtLeastOnce => wit::Qos::AtLeastOnce,
            Qos::ExactlyOnce => wit::Qos::ExactlyOnce,
        },
        retain: msg.retain,
        received_at_ms: msg.received_at_ms,
        headers: msg.headers,
    }
}

fn outcome_to_wit(outcome: Outcome) -> wit::Outcome {
    match outcome {
        Outcome::Forward(msg) => wit::Outcome::Forward(to_wit(msg)),
        Outcome::FanOut(msgs) => wit::Outcome::FanOut(msgs.into_iter().map(to_wit).collect()),
        Outcome::Drop(reason) => wit::Outcome::Drop(reason),
    }
}

fn error_to_wit(error: PluginError) -> wit::Error {
    wit::Error {
        kind: match error.kind {
            ErrorKind::Invalid => wit::ErrorKind::Invalid,
            ErrorKind::Transient => wit::ErrorKind::Transient,
        },
        message: error.message,
    }
}

pub(crate) fn write_log(level: crate::log::Level, message: &str, fields: &[(&str, &str)]) {
    use crate::log::Level;

    let level = match level {
        Level::Trace => wit_log::Level::Trace,
        Level::Debug => wit_log::Level::Debug,
        Level::Info => wit_log::Level::Info,
        Level::Warn => wit_log::Level::Warn,
        Level::Error => wit_log::Level::Error,
    };
    let fields: Vec<(String, String)> =
        fields.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    wit_log::write(level, message, &fields);
}
