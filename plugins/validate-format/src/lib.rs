use eliot_sdk::{Message, Outcome, PluginError, Processor};
struct V;
impl Processor for V {
    const NAME: &'static str = "validate-format";
    const VERSION: &'static str = "0.1.0";
    fn new(_c: serde_json::Value) -> Result<Self, String> { Ok(V) }
    fn process(&mut self, m: Message) -> Result<Outcome, PluginError> { Ok(Outcome::Forward(m)) }
}
eliot_sdk::export_processor!(V);
