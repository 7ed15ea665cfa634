//! The record of one attempt of a request that was retried or hedged.
//!
//! Responses and request errors carry the attempts under `"attempts"` when
//! there was more than one; with a single attempt the key is left out, so the
//! JSON is exactly the gem's.

use std::time::Duration;

use serde_json::{Map, Value};

use crate::{
    error::ErrorType,
    fields::{index, seconds_to_json, Fields},
    wire_error::{WireError, WireErrorKind},
};

/// One attempt: its number, what it produced, and how long it took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// 1 for the first attempt.
    pub number: u32,
    /// The response status, when it produced a response.
    pub status: Option<u16>,
    /// The kind of error, when it produced none.
    pub error_type: Option<ErrorType>,
    /// The class name of that error.
    pub error_class: Option<String>,
    /// How long it ran.
    pub duration: Duration,
    /// Whether it was a hedge started while an earlier attempt was still running.
    pub hedged: bool,
}

impl Attempt {
    /// The attempt as JSON: `{"attempt", "status", "error_type", "class_name", "duration", "hedged"}`.
    pub fn to_json(&self) -> Value {
        let mut map = Map::new();
        map.insert("attempt".into(), self.number.into());
        map.insert(
            "status".into(),
            self.status.map_or(Value::Null, Value::from),
        );
        map.insert(
            "error_type".into(),
            self.error_type
                .map_or(Value::Null, |t| Value::from(t.as_str())),
        );
        map.insert(
            "class_name".into(),
            self.error_class.clone().map_or(Value::Null, Value::from),
        );
        map.insert("duration".into(), seconds_to_json(self.duration));
        map.insert("hedged".into(), self.hedged.into());
        Value::Object(map)
    }

    /// An attempt from its JSON (what [`to_json`](Self::to_json) wrote); the
    /// error names the offending field.
    pub fn from_json(value: &Value) -> Result<Attempt, WireError> {
        Self::load(value, "")
    }

    pub(crate) fn load(value: &Value, path: &str) -> Result<Attempt, WireError> {
        let fields = Fields::new(value, path)?;
        let number = fields.u64("attempt")?;
        let status = fields.opt_u64("status")?;
        let error_type = match fields.opt_string("error_type")? {
            None => None,
            Some(name) => Some(ErrorType::from_name(name).ok_or_else(|| {
                WireError::new(
                    fields.path_of("error_type"),
                    WireErrorKind::UnknownValue {
                        value: name.to_owned(),
                        expected: ErrorType::NAMES,
                    },
                )
            })?),
        };
        Ok(Attempt {
            number: u32::try_from(number).map_err(|_| {
                WireError::new(
                    fields.path_of("attempt"),
                    WireErrorKind::OutOfRange {
                        value: number.to_string(),
                    },
                )
            })?,
            status: status.and_then(|s| u16::try_from(s).ok()),
            error_type,
            error_class: fields.opt_string("class_name")?.map(str::to_owned),
            duration: fields.seconds("duration")?,
            hedged: matches!(fields.value("hedged"), Some(Value::Bool(true))),
        })
    }
}

/// Writes `attempts` into an object when there was more than one.
pub(crate) fn insert_attempts(map: &mut Map<String, Value>, attempts: &[Attempt]) {
    if attempts.len() > 1 {
        map.insert(
            "attempts".into(),
            Value::Array(attempts.iter().map(Attempt::to_json).collect()),
        );
    }
}

/// Reads `attempts` from an object; absent or `null` is empty.
pub(crate) fn load_attempts(fields: &Fields<'_>) -> Result<Vec<Attempt>, WireError> {
    let path = fields.path_of("attempts");
    match fields.value("attempts") {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| Attempt::load(item, &index(&path, i)))
            .collect(),
        Some(v) => Err(WireError::wrong_type(path, "an array of attempts", v)),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::{Request, RequestError, Response};

    #[test]
    fn attempts_are_written_only_when_there_were_several() {
        let base = json!({
            "status": 200, "headers": {}, "body": null, "duration": 1.5,
            "request_id": "r", "url": "https://a.example/", "http_method": "get",
            "callback_args": {}, "redirects": []
        });
        let r = Response::from_json(&base).unwrap();
        assert!(r.attempts.is_empty());
        assert_eq!(r.to_json(), base, "no attempts key for the gem's shape");

        let mut with = base.clone();
        with["attempts"] = json!([
            {"attempt": 1, "status": 503, "error_type": null, "class_name": null, "duration": 0.5, "hedged": false},
            {"attempt": 2, "status": null, "error_type": "timeout", "class_name": "Timeout", "duration": 0.25, "hedged": true},
            {"attempt": 3, "status": 200, "error_type": null, "class_name": null, "duration": 0.75, "hedged": false}
        ]);
        let r = Response::from_json(&with).unwrap();
        assert_eq!(r.attempts.len(), 3);
        assert_eq!(r.attempts[1].error_type, Some(crate::ErrorType::Timeout));
        assert!(r.attempts[1].hedged);
        assert_eq!(r.to_json(), with);

        let e = json!({
            "class_name": "Timeout", "message": "m", "backtrace": [], "request_id": "r",
            "error_type": "timeout", "duration": 2, "url": "https://a.example/",
            "http_method": "get", "callback_args": {},
            "attempts": [{"attempt": 1, "status": null, "error_type": "xyz", "duration": 1}]
        });
        let err = RequestError::from_json(&e).unwrap_err();
        assert_eq!(err.path(), "attempts[0].error_type");
    }

    #[test]
    fn request_options_travel_with_the_request() {
        let r = Request::post("https://a.example/v1")
            .body("x")
            .priority(crate::Priority::High)
            .idempotency_key("k1")
            .deadline(std::time::Duration::from_secs(5))
            .build()
            .unwrap();
        let j = r.to_json();
        assert_eq!(j["options"]["priority"], "high");
        assert_eq!(j["options"]["idempotency_key"], "k1");
        assert_eq!(j["options"]["deadline"].as_f64(), Some(5.0));
        assert_eq!(Request::from_json(&j).unwrap(), r);
        let plain = Request::get("https://a.example/")
            .build()
            .unwrap()
            .to_json();
        assert!(plain.get("options").is_none());
        let bad = json!({"http_method": "get", "url": "https://a.example/", "headers": {},
            "body": null, "timeout": null, "max_redirects": null, "options": {"priority": "now"}});
        assert_eq!(
            Request::from_json(&bad).unwrap_err().path(),
            "options.priority"
        );
    }
}
