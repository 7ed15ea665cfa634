//! The PatientHttp gem's encryption against Ruby's real Active Support
//! (Debian's `ruby-activesupport`): Ruby encrypts and Rust decrypts, Rust
//! encrypts and Ruby decrypts, with rotation, both serializers and tampering.
//!
//! Skips with a message when `ruby` with Active Support is not installed,
//! unless `PATIENT_REQUIRE_SERVICES=1`, which makes it a failure.

use std::{
    io::Write,
    process::{Command, Stdio},
    sync::Arc,
};

use base64::{engine::general_purpose::STANDARD, Engine as _};
use patient_store::{
    activesupport::{marshal_dump_string, Serializer},
    Encryptor, PayloadCodec, StoreError,
};
use serde_json::{json, Value};

/// What the gem's `encryption_key=` sets up, and its `Encryptor`'s envelope.
const RUBY: &str = r#"
require "json"
require "active_support"
require "active_support/key_generator"
require "active_support/message_encryptor"
require "active_support/json"

mode, serializer, *keys = ARGV
generate = lambda do |key|
  ActiveSupport::KeyGenerator.new(key)
    .generate_key("patient_http_payload_encryption", ActiveSupport::MessageEncryptor.key_len)
end
options = {cipher: "aes-256-gcm"}
options[:serializer] = JSON if serializer == "json"
# ActiveSupport::JSON's encoding, as newer Active Support's `:json` serializer writes it.
module ActiveSupportJson
  def self.dump(value) = ActiveSupport::JSON.encode(value)
  def self.load(text) = ActiveSupport::JSON.decode(text)
end
options[:serializer] = ActiveSupportJson if serializer == "asjson"
encryptor = ActiveSupport::MessageEncryptor.new(generate.call(keys.first), **options)
keys[1..].each { |key| encryptor.rotate(generate.call(key)) }

input = $stdin.read
case mode
when "encrypt"
  json = JSON.generate(JSON.parse(input))
  puts JSON.generate("__encrypted__" => true, "value" => [encryptor.encrypt_and_sign(json)].pack("m0"))
when "decrypt"
  envelope = JSON.parse(input)
  begin
    puts JSON.generate(JSON.parse(encryptor.decrypt_and_verify(envelope["value"].unpack1("m"))))
  rescue ActiveSupport::MessageEncryptor::InvalidMessage
    warn "InvalidMessage"
    exit 3
  end
when "marshal"
  JSON.parse(input).each { |text| puts Marshal.dump(text).unpack1("H*") }
end
"#;

const OLD: &str = "the old encryption key";
const NEW: &str = "the new encryption key";

fn ruby_available() -> bool {
    let ok = Command::new("ruby")
        .args([
            "-e",
            "require 'active_support'; require 'active_support/message_encryptor'",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("PATIENT_REQUIRE_SERVICES").as_deref() != Ok("1"),
            "PATIENT_REQUIRE_SERVICES=1 but ruby with Active Support is not installed \
             (Debian: apt-get install ruby-activesupport)"
        );
        eprintln!("skipped: ruby with Active Support is not installed (ruby-activesupport)");
    }
    ok
}

/// Runs the Ruby side: `Ok(stdout)` or `Err((exit code, stderr))`.
fn ruby(mode: &str, serializer: &str, keys: &[&str], input: &str) -> Result<String, (i32, String)> {
    let mut child = Command::new("ruby")
        .args(["-e", RUBY, "--", mode, serializer])
        .args(keys)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ruby starts");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write to ruby");
    let output = child.wait_with_output().expect("ruby runs");
    if output.status.success() {
        Ok(String::from_utf8(output.stdout).expect("utf-8 output"))
    } else {
        Err((
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ))
    }
}

fn ruby_encrypt(serializer: &str, keys: &[&str], value: &Value) -> Value {
    let out = ruby("encrypt", serializer, keys, &value.to_string()).expect("ruby encrypts");
    serde_json::from_str(&out).expect("ruby prints an envelope")
}

fn ruby_decrypt(serializer: &str, keys: &[&str], envelope: &Value) -> Result<Value, i32> {
    match ruby("decrypt", serializer, keys, &envelope.to_string()) {
        Ok(out) => Ok(serde_json::from_str(&out).expect("ruby prints JSON")),
        Err((code, stderr)) => {
            assert_eq!(code, 3, "ruby failed otherwise: {stderr}");
            Err(code)
        }
    }
}

fn name(serializer: Serializer) -> &'static str {
    match serializer {
        Serializer::Marshal => "marshal",
        Serializer::Json => "json",
    }
}

fn payloads() -> Vec<Value> {
    vec![
        json!({"status": 200, "headers": {"content-type": "text/html"},
               "body": {"encoding": "text", "value": "<p>\"ünïcødé\" & ✓ 🦀 \u{2028} \\ /</p>"},
               "n": [1, -2, 2.5, null, true]}),
        json!({}),
        // Long enough for the 1-, 2- and 3-byte Marshal lengths.
        json!({"body": "x".repeat(100)}),
        json!({"body": "y".repeat(300)}),
        json!({"body": "é".repeat(40_000)}),
    ]
}

fn decrypt_error(encryptor: &Encryptor, value: &Value) -> String {
    match encryptor.decrypt(value) {
        Err(StoreError::Decrypt(message)) => message,
        other => panic!("expected a decrypt error, got {other:?}"),
    }
}

#[test]
fn ruby_encrypts_rust_decrypts() {
    if !ruby_available() {
        return;
    }
    for serializer in [Serializer::Marshal, Serializer::Json] {
        let rust = Encryptor::active_support(&[NEW], serializer).unwrap();
        for payload in payloads() {
            let sealed = ruby_encrypt(name(serializer), &[NEW], &payload);
            assert_eq!(sealed["__encrypted__"], true);
            assert_eq!(rust.decrypt(&sealed).unwrap(), payload, "{serializer:?}");
        }
    }
}

#[test]
fn rust_encrypts_ruby_decrypts() {
    if !ruby_available() {
        return;
    }
    for serializer in [Serializer::Marshal, Serializer::Json] {
        let rust = Encryptor::active_support(&[NEW], serializer).unwrap();
        for payload in payloads() {
            let sealed = rust.encrypt(&payload).unwrap();
            assert_eq!(
                ruby_decrypt(name(serializer), &[NEW], &sealed),
                Ok(payload),
                "{serializer:?}"
            );
        }
    }
}

#[test]
fn rotation_both_ways() {
    if !ruby_available() {
        return;
    }
    let payload = payloads().remove(0);
    for serializer in [Serializer::Marshal, Serializer::Json] {
        let s = name(serializer);
        let rotated = Encryptor::active_support(&[NEW, OLD], serializer).unwrap();
        let old_only = Encryptor::active_support(&[OLD], serializer).unwrap();

        // Written by Ruby before the rotation, read by Rust after it.
        let before = ruby_encrypt(s, &[OLD], &payload);
        assert_eq!(rotated.decrypt(&before).unwrap(), payload);
        // Written by Rust after the rotation: the new key, which Ruby with
        // only the new key reads, and Ruby with only the old one does not.
        let after = rotated.encrypt(&payload).unwrap();
        assert_eq!(ruby_decrypt(s, &[NEW], &after), Ok(payload.clone()));
        assert_eq!(ruby_decrypt(s, &[OLD], &after), Err(3));
        assert!(decrypt_error(&old_only, &after).contains("authentication failed"));
        // Written by Rust before the rotation, read by Ruby's `rotate`.
        let rust_before = old_only.encrypt(&payload).unwrap();
        assert_eq!(
            ruby_decrypt(s, &[NEW, OLD], &rust_before),
            Ok(payload.clone())
        );
        // Written by Ruby after its rotation: the new key only.
        let ruby_after = ruby_encrypt(s, &[NEW, OLD], &payload);
        assert_eq!(rotated.decrypt(&ruby_after).unwrap(), payload);
        assert!(decrypt_error(&old_only, &ruby_after).contains("authentication failed"));
    }
}

#[test]
fn either_serializer_is_read() {
    if !ruby_available() {
        return;
    }
    let payload = payloads().remove(0);
    let marshal = Encryptor::active_support(&[NEW], Serializer::Marshal).unwrap();
    let json = Encryptor::active_support(&[NEW], Serializer::Json).unwrap();
    assert_eq!(
        marshal
            .decrypt(&ruby_encrypt("json", &[NEW], &payload))
            .unwrap(),
        payload
    );
    assert_eq!(
        json.decrypt(&ruby_encrypt("marshal", &[NEW], &payload))
            .unwrap(),
        payload
    );
    // A serializer that encodes with `ActiveSupport::JSON`, which escapes
    // `<`, `>`, `&` and U+2028 as `\uXXXX`.
    for payload in payloads() {
        let from_ruby = ruby_encrypt("asjson", &[NEW], &payload);
        assert_eq!(json.decrypt(&from_ruby).unwrap(), payload);
        let from_rust = json.encrypt(&payload).unwrap();
        assert_eq!(ruby_decrypt("asjson", &[NEW], &from_rust), Ok(payload));
    }
}

#[tokio::test]
async fn the_codec_reads_and_writes_the_gem_format() {
    if !ruby_available() {
        return;
    }
    let payload = payloads().remove(0);
    let codec = PayloadCodec::new().with_encryptor(Arc::new(
        Encryptor::active_support(&[NEW, OLD], Serializer::Marshal).unwrap(),
    ));
    let from_ruby = ruby_encrypt("marshal", &[OLD], &payload);
    assert_eq!(codec.decode(&from_ruby).await.unwrap(), payload);
    let sent = codec.encode(&payload).await.unwrap();
    assert_eq!(ruby_decrypt("marshal", &[NEW], &sent), Ok(payload));
}

#[test]
fn tampering_is_a_clear_error_on_both_sides() {
    if !ruby_available() {
        return;
    }
    let payload = json!({"secret": "value"});
    let rust = Encryptor::active_support(&[NEW], Serializer::Marshal).unwrap();
    let message_of = |envelope: &Value| {
        String::from_utf8(
            STANDARD
                .decode(envelope["value"].as_str().unwrap())
                .unwrap(),
        )
        .unwrap()
    };
    let envelope_of =
        |message: &str| json!({"__encrypted__": true, "value": STANDARD.encode(message)});
    // One flipped bit in each part (ciphertext, IV, tag).
    let tamper = |message: &str, part: usize| {
        let mut parts: Vec<Vec<u8>> = message
            .split("--")
            .map(|p| STANDARD.decode(p).unwrap())
            .collect();
        parts[part][0] ^= 1;
        parts
            .iter()
            .map(|p| STANDARD.encode(p))
            .collect::<Vec<_>>()
            .join("--")
    };

    let from_ruby = message_of(&ruby_encrypt("marshal", &[NEW], &payload));
    let from_rust = message_of(&rust.encrypt(&payload).unwrap());
    for part in 0..3 {
        let message = decrypt_error(&rust, &envelope_of(&tamper(&from_ruby, part)));
        assert!(message.contains("authentication failed"), "{message}");
        assert_eq!(
            ruby_decrypt("marshal", &[NEW], &envelope_of(&tamper(&from_rust, part))),
            Err(3)
        );
    }
    // A wrong key.
    let other = Encryptor::active_support(&["another key"], Serializer::Marshal).unwrap();
    assert!(decrypt_error(&other, &envelope_of(&from_ruby)).contains("authentication failed"));
    // Malformed messages.
    let parts: Vec<&str> = from_ruby.split("--").collect();
    for (message, expected) in [
        (parts[..2].join("--"), "2 parts"),
        (format!("{from_ruby}--AAAA"), "4 parts"),
        (
            format!("{}--{}--!!", parts[0], parts[1]),
            "authentication tag",
        ),
        (format!("{}--AAAA--{}", parts[0], parts[2]), "IV of the"),
        (
            format!("{}--{}--AAAA", parts[0], parts[1]),
            "3 bytes; 16 expected",
        ),
    ] {
        let error = decrypt_error(&rust, &envelope_of(&message));
        assert!(error.contains(expected), "{message}: {error}");
    }
}

#[test]
fn marshal_matches_ruby_byte_for_byte() {
    if !ruby_available() {
        return;
    }
    let texts: Vec<String> = [0usize, 1, 122, 123, 255, 256, 65_535, 65_536, 70_001]
        .iter()
        .map(|&n| "ü".repeat(n / 2) + &"a".repeat(n % 2))
        .collect();
    let out = ruby("marshal", "marshal", &[NEW], &json!(texts).to_string()).unwrap();
    let expected: Vec<&str> = out.lines().collect();
    assert_eq!(expected.len(), texts.len());
    for (text, hex) in texts.iter().zip(expected) {
        let ours: String = marshal_dump_string(text)
            .unwrap()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(ours, hex, "{} bytes", text.len());
    }
}
