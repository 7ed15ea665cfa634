//! A gzipped payload that inflates to 256 MiB of zeros (from about 256 KiB
//! of gzip) is refused as soon as it passes the body limit, without the
//! memory to hold it.
//!
//! One test in its own binary, so the peak memory it measures is its own.

use std::io::Write as _;

use base64::Engine as _;
use patient_wire::{Payload, PayloadEncoding, Request, Response, TaskError, WireError, WireLimits};
use serde_json::{json, Value};

const MIB: usize = 1 << 20;

/// 256 MiB of zeros as gzip: sixteen members of 16 MiB each (a multi-member
/// stream inflates to their concatenation), in Base64.
fn bomb() -> String {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(&vec![0; 16 * MIB]).unwrap();
    let member = encoder.finish().unwrap();
    let gz: Vec<u8> = member.repeat(16);
    assert!(gz.len() < 512 * 1024, "{} bytes of gzip", gz.len());
    base64::engine::general_purpose::STANDARD.encode(gz)
}

fn response(body: &Value) -> Value {
    json!({
        "status": 200, "headers": {"content-type": "text/plain"}, "body": body,
        "duration": 0.5, "request_id": "r", "url": "http://127.0.0.1:1/", "http_method": "get"
    })
}

/// Peak resident memory of this process, in bytes, since the last
/// [`reset_peak`] (Linux only).
fn peak_rss() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Resets the peak to the current resident memory; false where that is not
/// possible (then the peak is that of the whole run so far).
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

#[track_caller]
fn assert_body_limit(error: &WireError, path: &str, max: usize) {
    assert_eq!(error.path(), path, "{error}");
    let limit = error.limit().unwrap_or_else(|| panic!("{error}"));
    assert_eq!(limit.limit(), "max_body_size");
    assert_eq!(limit.max(), patient_wire::Bound::Bytes(max));
    assert_eq!(limit.found(), None, "the bomb is not inflated to its end");
    let message = error.to_string();
    assert!(
        message.contains(path) && message.contains(&max.to_string()),
        "{message}"
    );
}

#[test]
fn a_gzip_bomb_is_refused_without_inflating_it() {
    let body = json!({"encoding": "gzipped", "value": bomb(), "charset": "UTF-8"});
    let payload = Payload::from_json(&body).unwrap();
    let small = WireLimits::default().with_max_body_size(MIB);
    let measured = reset_peak();
    let before = peak_rss();

    // A small configured limit: nothing near 256 MiB is ever held.
    let error = Response::from_json_with_limits(&response(&body), &small).unwrap_err();
    assert_body_limit(&error, "body.value", MIB);
    let error =
        TaskError::load_with_limits(&json!({"response": response(&body)}), &small).unwrap_err();
    assert_body_limit(&error, "response.body.value", MIB);
    let request = json!({"http_method": "post", "url": "http://127.0.0.1:1/",
        "headers": {"content-type": "text/plain"}, "body": body});
    let error = Request::from_json_with_limits(&request, &small).unwrap_err();
    assert_body_limit(&error, "body.value", MIB);
    assert_body_limit(
        &payload.decode_with_limits(&small).unwrap_err(),
        "value",
        MIB,
    );
    assert!(matches!(
        payload.decode_limited(MIB).unwrap_err().kind(),
        patient_wire::WireErrorKind::TooLarge { limit } if *limit == MIB
    ));
    if let (true, Some(before), Some(after)) = (measured, before, peak_rss()) {
        let grown = after.saturating_sub(before);
        assert!(grown < 32 * MIB, "peak memory grew by {} MiB", grown / MIB);
    }

    // The default limit, 64 MiB: refused too, holding at most that much.
    let measured = reset_peak();
    let before = peak_rss();
    let error = Response::from_json(&response(&body)).unwrap_err();
    assert_body_limit(&error, "body.value", 64 * MIB);
    assert_body_limit(&payload.decode().unwrap_err(), "value", 64 * MIB);
    if let (true, Some(before), Some(after)) = (measured, before, peak_rss()) {
        let grown = after.saturating_sub(before);
        assert!(grown < 200 * MIB, "peak memory grew by {} MiB", grown / MIB);
    }

    // Within the limit, the same stream inflates.
    let roomy = WireLimits::default().with_max_body_size(256 * MIB);
    let bytes = payload.decode_with_limits(&roomy).unwrap();
    assert_eq!(bytes.len(), 256 * MIB);
    assert_eq!(payload.encoding, PayloadEncoding::Gzipped);
}
