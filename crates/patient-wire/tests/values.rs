//! Callback args, headers with secrets, storage references and the
//! encrypted envelope.

use patient_wire::{
    is_encrypted, is_secret_ref, is_storage_ref, CallbackArgs, EncryptedEnvelope, HeaderValue,
    Headers, SecretRef, StorageRef,
};
use serde::Serialize;
use serde_json::json;

#[derive(Serialize)]
struct Tagged {
    user: User,
}

#[derive(Serialize)]
struct User {
    name: String,
    tags: Vec<f64>,
}

#[test]
fn callback_args_round_trip() {
    let value = json!({"user_id": 123, "flags": [true, null], "nested": {"a": "b", "f": 1.25}});
    let args = CallbackArgs::from_value(value.clone()).unwrap();
    let text = serde_json::to_string(&args).unwrap();
    assert_eq!(serde_json::from_str::<CallbackArgs>(&text).unwrap(), args);
    assert_eq!(args.clone().into_value(), value);

    let mut built = CallbackArgs::new();
    built.insert("user_id", 123);
    built.insert("name", "ada");
    assert_eq!(built.get("user_id"), Some(&json!(123)));
    assert_eq!(built.len(), 2);
}

#[test]
fn callback_args_from_serialize_names_the_path() {
    let ok = CallbackArgs::from_serialize(&Tagged {
        user: User {
            name: "ada".into(),
            tags: vec![1.0],
        },
    })
    .unwrap();
    assert_eq!(
        ok.into_value(),
        json!({"user": {"name": "ada", "tags": [1.0]}})
    );

    let err = CallbackArgs::from_serialize(&Tagged {
        user: User {
            name: "ada".into(),
            tags: vec![1.0, 2.0, f64::INFINITY],
        },
    })
    .unwrap_err();
    assert_eq!(err.path, "user.tags[2]");

    let err = CallbackArgs::from_serialize(&vec![1, 2]).unwrap_err();
    assert_eq!(err.path, "");
    let err = CallbackArgs::from_serialize(&"text").unwrap_err();
    assert!(err.reason.contains("object"));
}

#[test]
fn headers_with_secrets_round_trip() {
    let mut headers = Headers::new();
    headers.insert("Authorization", SecretRef::new("api_key"));
    headers.insert("Accept", "application/json");
    headers.append("Accept", "text/plain");
    let wire = headers.to_json();
    assert_eq!(
        wire,
        json!({"authorization": {"$secret": "api_key"}, "accept": "application/json, text/plain"})
    );
    assert!(is_secret_ref(&wire["authorization"]));
    let loaded: Headers = serde_json::from_value(wire).unwrap();
    assert_eq!(loaded, headers);
    assert_eq!(
        loaded.get("authorization").and_then(HeaderValue::secret),
        Some(&SecretRef::new("api_key"))
    );
    // Mixed-case names in a fixture are lower-cased.
    let loaded = Headers::from_json(&json!({"X-Trace": "1"})).unwrap();
    assert_eq!(loaded.iter().next().map(|(n, _)| n), Some("x-trace"));
}

#[test]
fn storage_ref_round_trip() {
    let r = StorageRef::new("redis", "0b6e3c1e-4f5a-4c2b-9f0e-3c1d2e4f5a6b");
    let wire = r.to_json();
    assert_eq!(
        wire,
        json!({"$ref": {"store": "redis", "key": "0b6e3c1e-4f5a-4c2b-9f0e-3c1d2e4f5a6b"}})
    );
    assert!(is_storage_ref(&wire));
    assert_eq!(StorageRef::from_json(&wire).unwrap(), r);
    assert_eq!(serde_json::from_value::<StorageRef>(wire).unwrap(), r);

    assert!(!is_storage_ref(&json!({"status": 200})));
    assert!(!is_storage_ref(&json!({"$ref": "x"})));
    assert!(!is_storage_ref(&json!({"$ref": {"store": "s"}})));
    assert_eq!(
        StorageRef::from_json(&json!({"$ref": {"store": "s"}}))
            .unwrap_err()
            .path(),
        "$ref.key"
    );
}

#[test]
fn encrypted_envelope_round_trip() {
    let envelope = EncryptedEnvelope::from_ciphertext(&[1, 2, 3, 250]);
    let wire = envelope.to_json();
    assert_eq!(wire, json!({"__encrypted__": true, "value": "AQID+g=="}));
    assert!(is_encrypted(&wire));
    let loaded = EncryptedEnvelope::from_json(&wire).unwrap();
    assert_eq!(loaded, envelope);
    assert_eq!(loaded.ciphertext().unwrap(), [1, 2, 3, 250]);

    assert!(!is_encrypted(&json!({"status": 200})));
    assert!(!is_encrypted(&json!({"__encrypted__": false, "value": ""})));
    assert!(!is_encrypted(&json!("text")));
    assert_eq!(
        EncryptedEnvelope::from_json(&json!({"__encrypted__": "yes", "value": ""}))
            .unwrap_err()
            .path(),
        "__encrypted__"
    );
}
