//! The PatientHttp gem's encryption against Ruby's real Active Support
//! (Debian's `ruby-activesupport`): Ruby encrypts and Rust decrypts, Rust
//! encrypts and Ruby decrypts, with rotation, both serializers, both key
//! digests (`KeyGenerator`'s `hash_digest_class`: SHA-1, and SHA-256 as
//! Rails 7 apps set it) and tampering. Active Support 6.1 (Debian's) has no
//! `hash_digest_class` yet: there the Ruby side derives the SHA-256 key as
//! 7.0's `KeyGenerator` does, and encrypts with the installed
//! `MessageEncryptor`.
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
    activesupport::{marshal_dump_string, KeyDigest, Options, Serializer},
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

mode, serializer, digest, *keys = ARGV
# `KeyGenerator`'s digest: SHA-1 (its default) or SHA-256 (what Rails 7's
# `load_defaults` set).
digest_class = {"sha1" => OpenSSL::Digest::SHA1, "sha256" => OpenSSL::Digest::SHA256}.fetch(digest)
generate = lambda do |key|
  salt = "patient_http_payload_encryption"
  len = ActiveSupport::MessageEncryptor.key_len
  if ActiveSupport::KeyGenerator.respond_to?(:hash_digest_class) || digest == "sha1"
    ActiveSupport::KeyGenerator.new(key, iterations: 2**16, hash_digest_class: digest_class)
      .generate_key(salt, len)
  else
    # Active Support before 7.0 ignores `hash_digest_class:` (SHA-1 always):
    # derive as 7.0's `KeyGenerator#generate_key` does.
    OpenSSL::PKCS5.pbkdf2_hmac(key, salt, 2**16, len, digest_class.new)
  end
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

/// Both key digests, the default first.
const DIGESTS: [KeyDigest; 2] = [KeyDigest::Sha1, KeyDigest::Sha256];

/// The Rust side with the Ruby side's serializer and key digest.
fn rust_side(keys: &[&str], serializer: Serializer, digest: KeyDigest) -> Encryptor {
    Encryptor::active_support_with(
        keys,
        Options::new()
            .with_serializer(serializer)
            .with_key_digest(digest),
    )
    .unwrap()
}

/// Runs the Ruby side: `Ok(stdout)` or `Err((exit code, stderr))`.
fn ruby(
    mode: &str,
    serializer: &str,
    digest: KeyDigest,
    keys: &[&str],
    input: &str,
) -> Result<String, (i32, String)> {
    let mut child = Command::new("ruby")
        .args(["-e", RUBY, "--", mode, serializer, digest.as_str()])
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

fn ruby_encrypt(serializer: &str, digest: KeyDigest, keys: &[&str], value: &Value) -> Value {
    let out = ruby("encrypt", serializer, digest, keys, &value.to_string()).expect("ruby encrypts");
    serde_json::from_str(&out).expect("ruby prints an envelope")
}

fn ruby_decrypt(
    serializer: &str,
    digest: KeyDigest,
    keys: &[&str],
    envelope: &Value,
) -> Result<Value, i32> {
    match ruby("decrypt", serializer, digest, keys, &envelope.to_string()) {
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
    for digest in DIGESTS {
        for serializer in [Serializer::Marshal, Serializer::Json] {
            let rust = rust_side(&[NEW], serializer, digest);
            for payload in payloads() {
                let sealed = ruby_encrypt(name(serializer), digest, &[NEW], &payload);
                assert_eq!(sealed["__encrypted__"], true);
                assert_eq!(
                    rust.decrypt(&sealed).unwrap(),
                    payload,
                    "{serializer:?} {digest}"
                );
            }
        }
    }
}

#[test]
fn rust_encrypts_ruby_decrypts() {
    if !ruby_available() {
        return;
    }
    for digest in DIGESTS {
        for serializer in [Serializer::Marshal, Serializer::Json] {
            let rust = rust_side(&[NEW], serializer, digest);
            for payload in payloads() {
                let sealed = rust.encrypt(&payload).unwrap();
                assert_eq!(
                    ruby_decrypt(name(serializer), digest, &[NEW], &sealed),
                    Ok(payload),
                    "{serializer:?} {digest}"
                );
            }
        }
    }
}

/// The default is SHA-1, what `KeyGenerator.new(key)` derives with before
/// Rails 7: `active_support` and the default options are that.
#[test]
fn the_default_key_digest_is_sha1() {
    if !ruby_available() {
        return;
    }
    let payload = payloads().remove(0);
    assert_eq!(KeyDigest::default(), KeyDigest::Sha1);
    for rust in [
        Encryptor::active_support(&[NEW], Serializer::Marshal).unwrap(),
        Encryptor::active_support_with(&[NEW], Options::default()).unwrap(),
    ] {
        let from_ruby = ruby_encrypt("marshal", KeyDigest::Sha1, &[NEW], &payload);
        assert_eq!(rust.decrypt(&from_ruby).unwrap(), payload);
        let sealed = rust.encrypt(&payload).unwrap();
        assert_eq!(
            ruby_decrypt("marshal", KeyDigest::Sha1, &[NEW], &sealed),
            Ok(payload.clone())
        );
    }
}

/// A message whose key was derived with the other digest is refused with
/// an error that names both digests, whichever way round, alone or behind
/// another secret in a rotation; Ruby refuses ours as it refuses any message
/// of another key.
#[test]
fn a_wrong_key_digest_is_a_clear_error_on_both_sides() {
    if !ruby_available() {
        return;
    }
    let payload = payloads().remove(0);
    for (written_with, configured) in [
        (KeyDigest::Sha256, KeyDigest::Sha1),
        (KeyDigest::Sha1, KeyDigest::Sha256),
    ] {
        let rust = rust_side(&[OLD, NEW], Serializer::Marshal, configured);
        for (serializer, keys) in [("marshal", &[NEW][..]), ("json", &[OLD])] {
            let from_ruby = ruby_encrypt(serializer, written_with, keys, &payload);
            let error = rust.decrypt(&from_ruby).unwrap_err();
            assert!(
                matches!(
                    error,
                    StoreError::KeyDigestMismatch { configured: c, written_with: w }
                        if (c, w) == (configured, written_with)
                ),
                "{written_with} read as {configured}: {error:?}"
            );
            let message = error.to_string();
            for words in [
                format!("derived with {written_with}"),
                written_with.ruby_class().to_owned(),
                format!("key digest is {configured}"),
                format!("set the key digest to {written_with}"),
            ] {
                assert!(message.contains(&words), "{words:?} in {message}");
            }
        }
        let from_rust = rust_side(&[NEW], Serializer::Marshal, written_with)
            .encrypt(&payload)
            .unwrap();
        assert_eq!(
            ruby_decrypt("marshal", configured, &[NEW], &from_rust),
            Err(3)
        );
        assert_eq!(
            ruby_decrypt("marshal", written_with, &[NEW], &from_rust),
            Ok(payload.clone())
        );
        // A key that is not configured, under either digest, is no digest
        // mismatch: an unknown key.
        for digest in DIGESTS {
            let from_ruby = ruby_encrypt("marshal", digest, &["another key"], &payload);
            let message = decrypt_error(&rust, &from_ruby);
            assert!(message.contains("authentication failed"), "{message}");
        }
    }
}

#[test]
fn rotation_both_ways() {
    if !ruby_available() {
        return;
    }
    let payload = payloads().remove(0);
    for (serializer, digest) in [
        (Serializer::Marshal, KeyDigest::Sha1),
        (Serializer::Json, KeyDigest::Sha1),
        (Serializer::Marshal, KeyDigest::Sha256),
    ] {
        let s = name(serializer);
        let rotated = rust_side(&[NEW, OLD], serializer, digest);
        let old_only = rust_side(&[OLD], serializer, digest);

        // Written by Ruby before the rotation, read by Rust after it.
        let before = ruby_encrypt(s, digest, &[OLD], &payload);
        assert_eq!(rotated.decrypt(&before).unwrap(), payload);
        // Written by Rust after the rotation: the new key, which Ruby with
        // only the new key reads, and Ruby with only the old one does not.
        let after = rotated.encrypt(&payload).unwrap();
        assert_eq!(ruby_decrypt(s, digest, &[NEW], &after), Ok(payload.clone()));
        assert_eq!(ruby_decrypt(s, digest, &[OLD], &after), Err(3));
        assert!(decrypt_error(&old_only, &after).contains("authentication failed"));
        // Written by Rust before the rotation, read by Ruby's `rotate`.
        let rust_before = old_only.encrypt(&payload).unwrap();
        assert_eq!(
            ruby_decrypt(s, digest, &[NEW, OLD], &rust_before),
            Ok(payload.clone())
        );
        // Written by Ruby after its rotation: the new key only.
        let ruby_after = ruby_encrypt(s, digest, &[NEW, OLD], &payload);
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
            .decrypt(&ruby_encrypt("json", KeyDigest::Sha1, &[NEW], &payload))
            .unwrap(),
        payload
    );
    assert_eq!(
        json.decrypt(&ruby_encrypt("marshal", KeyDigest::Sha1, &[NEW], &payload))
            .unwrap(),
        payload
    );
    // A serializer that encodes with `ActiveSupport::JSON`, which escapes
    // `<`, `>`, `&` and U+2028 as `\uXXXX`.
    for payload in payloads() {
        let from_ruby = ruby_encrypt("asjson", KeyDigest::Sha1, &[NEW], &payload);
        assert_eq!(json.decrypt(&from_ruby).unwrap(), payload);
        let from_rust = json.encrypt(&payload).unwrap();
        assert_eq!(
            ruby_decrypt("asjson", KeyDigest::Sha1, &[NEW], &from_rust),
            Ok(payload)
        );
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
    let from_ruby = ruby_encrypt("marshal", KeyDigest::Sha1, &[OLD], &payload);
    assert_eq!(codec.decode(&from_ruby).await.unwrap(), payload);
    let sent = codec.encode(&payload).await.unwrap();
    assert_eq!(
        ruby_decrypt("marshal", KeyDigest::Sha1, &[NEW], &sent),
        Ok(payload)
    );
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

    let from_ruby = message_of(&ruby_encrypt("marshal", KeyDigest::Sha1, &[NEW], &payload));
    let from_rust = message_of(&rust.encrypt(&payload).unwrap());
    for part in 0..3 {
        let message = decrypt_error(&rust, &envelope_of(&tamper(&from_ruby, part)));
        assert!(message.contains("authentication failed"), "{message}");
        assert_eq!(
            ruby_decrypt(
                "marshal",
                KeyDigest::Sha1,
                &[NEW],
                &envelope_of(&tamper(&from_rust, part))
            ),
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
    let out = ruby(
        "marshal",
        "marshal",
        KeyDigest::Sha1,
        &[NEW],
        &json!(texts).to_string(),
    )
    .unwrap();
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
