//! MQTT topic filters: validation and matching as the MQTT 3.1.1 and 5
//! specifications define them.

use std::fmt;

/// A validated topic filter such as `devices/+/telemetry` or `devices/#`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicFilter {
    text: String,
}

impl TopicFilter {
    /// Validates `filter`.
    ///
    /// # Errors
    ///
    /// Returns what is wrong: an empty filter, a `#` that is not the whole
    /// last level, a `+` mixed into a level, or a NUL character.
    pub fn parse(filter: &str) -> Result<Self, String> {
        if filter.is_empty() {
            return Err("a topic filter must not be empty".to_owned());
        }
        if filter.len() > crate::config::MQTT_MAX_STRING_BYTES {
            return Err(format!(
                "a topic filter is at most {} bytes, this one is {}",
                crate::config::MQTT_MAX_STRING_BYTES,
                filter.len()
            ));
        }
        if filter.contains('\0') {
            return Err("a topic filter must not contain the NUL character".to_owned());
        }
        let levels: Vec<&str> = filter.split('/').collect();
        for (index, level) in levels.iter().enumerate() {
            let last = index + 1 == levels.len();
            if level.contains('#') && (*level != "#" || !last) {
                return Err(format!(
                    "\"#\" must be a whole level and the last one, but level {} is \"{level}\"",
                    index + 1
                ));
            }
            if level.contains('+') && *level != "+" {
                return Err(format!(
                    "\"+\" must be a whole level, but level {} is \"{level}\"",
                    index + 1
                ));
            }
        }
        Ok(Self {
            text: filter.to_owned(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Tells whether `topic` matches this filter. Empty levels count as
    /// levels, and a topic whose first level starts with `$` is matched only
    /// by a filter whose first level is written out, not by `+` or `#`.
    pub fn matches(&self, topic: &str) -> bool {
        if topic.starts_with('$') && (self.text.starts_with('+') || self.text.starts_with('#')) {
            return false;
        }
        let mut topic_levels = topic.split('/');
        for filter_level in self.text.split('/') {
            if filter_level == "#" {
                return true;
            }
            match topic_levels.next() {
                Some(level) if filter_level == "+" || filter_level == level => {}
                _ => return false,
            }
        }
        topic_levels.next().is_none()
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(filter: &str, topic: &str) -> bool {
        TopicFilter::parse(filter).unwrap().matches(topic)
    }

    #[test]
    fn parse_rejects_misplaced_wildcards() {
        assert_eq!(
            TopicFilter::parse("a/#/b").unwrap_err(),
            "\"#\" must be a whole level and the last one, but level 2 is \"#\""
        );
        assert_eq!(
            TopicFilter::parse("a/b#").unwrap_err(),
            "\"#\" must be a whole level and the last one, but level 2 is \"b#\""
        );
        assert_eq!(
            TopicFilter::parse("a/b+/c").unwrap_err(),
            "\"+\" must be a whole level, but level 2 is \"b+\""
        );
        assert_eq!(
            TopicFilter::parse("").unwrap_err(),
            "a topic filter must not be empty"
        );
        assert_eq!(
            TopicFilter::parse("a+/b").unwrap_err(),
            "\"+\" must be a whole level, but level 1 is \"a+\""
        );
        assert_eq!(
            TopicFilter::parse("#/a").unwrap_err(),
            "\"#\" must be a whole level and the last one, but level 1 is \"#\""
        );
        assert_eq!(
            TopicFilter::parse("a/\0/b").unwrap_err(),
            "a topic filter must not contain the NUL character"
        );
    }

    #[test]
    fn leading_slash_is_its_own_level() {
        assert!(matches("/a", "/a"));
        assert!(!matches("/a", "a"));
        assert!(!matches("a", "/a"));
        assert!(matches("/#", "/a/b"));
        assert!(!matches("/#", "a/b"));
        assert!(matches("a/", "a/"));
        assert!(!matches("a/", "a"));
        assert!(matches("a/+", "a/"), "+ matches an empty level");
    }

    #[test]
    fn parse_accepts_valid_filters() {
        for filter in ["#", "+", "a/+/c", "a/#", "/", "sport//tennis/+/#", "$SYS/#"] {
            assert!(
                TopicFilter::parse(filter).is_ok(),
                "{filter} should be valid"
            );
        }
    }

    #[test]
    fn single_level_wildcard() {
        assert!(matches(
            "devices/+/telemetry",
            "devices/robot_001/telemetry"
        ));
        assert!(!matches("devices/+/telemetry", "devices/robot_001/status"));
        assert!(!matches("devices/+/telemetry", "devices/a/b/telemetry"));
        assert!(matches("devices/+/telemetry", "devices//telemetry"));
        assert!(!matches("devices/+", "devices"));
    }

    #[test]
    fn multi_level_wildcard() {
        assert!(matches("devices/#", "devices"));
        assert!(matches("devices/#", "devices/a/b/c"));
        assert!(matches("#", "anything/at/all"));
        assert!(!matches("devices/#", "device/x"));
    }

    #[test]
    fn empty_levels_and_leading_slash() {
        assert!(matches(
            "sport//tennis/player1/#",
            "sport//tennis/player1//wimbledon"
        ));
        assert!(!matches("sport/tennis/player1/#", "sport//tennis/player1"));
        assert!(matches("/+", "/finance"));
        assert!(!matches("+", "/finance"));
        assert!(matches("+/+", "/finance"));
    }

    #[test]
    fn dollar_topics_need_explicit_first_level() {
        assert!(!matches("#", "$SYS/broker/load"));
        assert!(!matches("+/broker/load", "$SYS/broker/load"));
        assert!(matches("$SYS/#", "$SYS/broker/load"));
        assert!(matches("$SYS/+/load", "$SYS/broker/load"));
        assert!(!matches("+/#", "$share/x"));
        assert!(!matches("#", "$"));
        assert!(matches("a/#", "a/$b"), "only the first level is special");
    }
}
