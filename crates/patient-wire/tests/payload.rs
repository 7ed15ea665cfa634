//! Payload encoding rules of the wire format.

use std::io::Write;

use base64::{engine::general_purpose::STANDARD, Engine as _};
use flate2::{write::GzEncoder, Compression};
use patient_wire::{Payload, PayloadEncoding, GZIP_THRESHOLD};
use serde_json::json;

fn gzip_len(bytes: &[u8]) -> usize {
    let mut e = GzEncoder::new(Vec::new(), Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap().len()
}

/// A small deterministic generator (xorshift64*), so tests need no RNG crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Valid UTF-8 of exactly `len` bytes whose byte values are spread about as
/// evenly as UTF-8 allows, so gzip cannot make it smaller.
fn incompressible_text(len: usize, seed: u64) -> String {
    let mut rng = Rng(seed);
    let mut s = String::with_capacity(len);
    while s.len() + 4 <= len {
        let class = rng.below(179);
        let c = if class < 128 {
            char::from_u32(rng.below(0x80) as u32)
        } else if class < 158 {
            char::from_u32(0x80 + rng.below(0x780) as u32)
        } else if class < 174 {
            char::from_u32(0x800 + rng.below(0xF800) as u32)
        } else {
            char::from_u32(0x10000 + rng.below(0x100000) as u32)
        };
        if let Some(c) = c {
            s.push(c);
        }
    }
    while s.len() < len {
        s.push(char::from(rng.below(0x80) as u8));
    }
    s
}

#[test]
fn short_text_stays_text() {
    let p = Payload::encode(b"{\"id\":1}", Some("application/json"));
    assert_eq!(
        p.to_json(),
        json!({"encoding": "text", "value": "{\"id\":1}", "charset": "UTF-8"})
    );
    assert_eq!(p.decode().unwrap(), b"{\"id\":1}");
    assert_eq!(Payload::from_json(&p.to_json()).unwrap(), p);
}

#[test]
fn text_of_4095_bytes_stays_text() {
    let body = "a".repeat(GZIP_THRESHOLD - 1);
    let p = Payload::encode(body.as_bytes(), Some("text/plain"));
    assert_eq!(p.encoding, PayloadEncoding::Text);
    assert_eq!(p.value, body);
}

#[test]
fn compressible_text_of_4096_bytes_is_gzipped() {
    let body = "a".repeat(GZIP_THRESHOLD);
    let p = Payload::encode(body.as_bytes(), Some("text/plain; charset=utf-8"));
    assert_eq!(p.encoding, PayloadEncoding::Gzipped);
    assert_eq!(p.charset, "UTF-8");
    assert!(!p.value.contains('\n'), "Base64 must have no line breaks");
    let gz = STANDARD.decode(&p.value).unwrap();
    assert_eq!(&gz[..2], &[0x1f, 0x8b], "gzip magic");
    assert_eq!(p.decode().unwrap(), body.as_bytes());
    let loaded = Payload::from_json(&p.to_json()).unwrap();
    assert_eq!(loaded.decode().unwrap(), body.as_bytes());
}

#[test]
fn incompressible_text_of_4096_bytes_stays_text() {
    let body = incompressible_text(GZIP_THRESHOLD, 0x9E37_79B9_7F4A_7C15);
    assert_eq!(body.len(), GZIP_THRESHOLD);
    assert!(
        gzip_len(body.as_bytes()) >= body.len(),
        "precondition: gzip does not shrink the text"
    );
    let p = Payload::encode(body.as_bytes(), Some("text/plain"));
    assert_eq!(p.encoding, PayloadEncoding::Text);
    assert_eq!(p.value, body);
    assert_eq!(p.decode().unwrap(), body.as_bytes());
}

#[test]
fn binary_is_base64_without_line_breaks() {
    let body: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
    let p = Payload::encode(&body, Some("image/png"));
    assert_eq!(p.encoding, PayloadEncoding::Binary);
    assert_eq!(p.charset, "ASCII-8BIT");
    assert!(!p.value.contains('\n'));
    assert_eq!(p.value, STANDARD.encode(&body));
    assert_eq!(p.decode().unwrap(), body);
    assert_eq!(
        Payload::from_json(&p.to_json()).unwrap().decode().unwrap(),
        body
    );
}

#[test]
fn no_content_type_is_binary() {
    let p = Payload::encode(b"hello", None);
    assert_eq!(
        p.to_json(),
        json!({"encoding": "binary", "value": "aGVsbG8=", "charset": "ASCII-8BIT"})
    );
}

#[test]
fn iso_8859_1_is_transcoded_to_utf8() {
    let body = [b'c', b'a', b'f', 0xE9];
    let ct = "text/plain; charset=ISO-8859-1";
    let p = Payload::encode(&body, Some(ct));
    assert_eq!(
        p.to_json(),
        json!({"encoding": "text", "value": "café", "charset": "UTF-8"})
    );
    assert_eq!(p.decode().unwrap(), "café".as_bytes());
    assert_eq!(p.decode_for(Some(ct)).unwrap(), body);
}

#[test]
fn shift_jis_is_transcoded_to_utf8() {
    // "こんにちは" in Shift_JIS.
    let body = [0x82, 0xB1, 0x82, 0xF1, 0x82, 0xC9, 0x82, 0xBF, 0x82, 0xCD];
    let ct = "text/html; charset=Shift_JIS";
    let p = Payload::encode(&body, Some(ct));
    assert_eq!(p.encoding, PayloadEncoding::Text);
    assert_eq!(p.value, "こんにちは");
    assert_eq!(p.charset, "UTF-8");
    assert_eq!(p.decode_for(Some(ct)).unwrap(), body);
}

#[test]
fn undecodable_declared_text_is_stored_as_binary() {
    // 0x82 starts a two-byte Shift_JIS character; 0x20 cannot follow it.
    let body = [b'a', 0x82, 0x20];
    let p = Payload::encode(&body, Some("text/plain; charset=shift_jis"));
    assert_eq!(p.encoding, PayloadEncoding::Binary);
    assert_eq!(p.charset, "ASCII-8BIT");
    assert_eq!(p.decode().unwrap(), body);
}

#[test]
fn invalid_utf8_without_charset_is_binary_and_decodes_exactly() {
    let body = [b'o', b'k', 0xFF, 0xFE, 0x00, 0xC3];
    for ct in [
        "text/plain",
        "application/json",
        "text/plain; charset=utf-8",
    ] {
        let p = Payload::encode(&body, Some(ct));
        assert_eq!(p.encoding, PayloadEncoding::Binary, "{ct}");
        let loaded = Payload::from_json(&p.to_json()).unwrap();
        assert_eq!(loaded.decode().unwrap(), body);
        assert_eq!(loaded.decode_for(Some(ct)).unwrap(), body);
    }
}

#[test]
fn unknown_charset_is_treated_as_none() {
    let p = Payload::encode("héllo".as_bytes(), Some("text/plain; charset=x-made-up"));
    assert_eq!(p.encoding, PayloadEncoding::Text);
    assert_eq!(p.value, "héllo");
}

#[test]
fn long_latin1_text_is_transcoded_then_gzipped() {
    let body: Vec<u8> = std::iter::repeat_n([b'a', 0xE9], 3000).flatten().collect();
    let ct = "text/plain; charset=iso-8859-1";
    let p = Payload::encode(&body, Some(ct));
    assert_eq!(p.encoding, PayloadEncoding::Gzipped);
    assert_eq!(p.decode().unwrap(), "aé".repeat(3000).as_bytes());
    assert_eq!(p.decode_for(Some(ct)).unwrap(), body);
}

#[test]
fn gem_fixtures_load() {
    // Written as the Ruby gem writes them.
    let text = json!({"encoding": "text", "value": "hello", "charset": "UTF-8"});
    assert_eq!(
        Payload::from_json(&text).unwrap().decode().unwrap(),
        b"hello"
    );

    // Non-ASCII text the gem stored without a charset parameter.
    let ascii8 = json!({"encoding": "text", "value": "naïve", "charset": "ASCII-8BIT"});
    assert_eq!(
        Payload::from_json(&ascii8).unwrap().decode().unwrap(),
        "naïve".as_bytes()
    );

    let mut gz = GzEncoder::new(Vec::new(), Compression::best());
    gz.write_all("x".repeat(5000).as_bytes()).unwrap();
    let gz = gz.finish().unwrap();
    // Ruby's pack("m") (older gem versions) breaks lines every 60 characters.
    let wrapped: String = STANDARD
        .encode(&gz)
        .as_bytes()
        .chunks(60)
        .map(|c| format!("{}\n", std::str::from_utf8(c).unwrap()))
        .collect();
    let gzipped = json!({"encoding": "gzipped", "value": wrapped, "charset": "UTF-8"});
    assert_eq!(
        Payload::from_json(&gzipped).unwrap().decode().unwrap(),
        "x".repeat(5000).as_bytes()
    );

    let binary = json!({"encoding": "binary", "value": "AAEC/w==", "charset": "ASCII-8BIT"});
    assert_eq!(
        Payload::from_json(&binary).unwrap().decode().unwrap(),
        [0, 1, 2, 255]
    );

    // A missing charset defaults by encoding.
    let no_charset = json!({"encoding": "binary", "value": "AA=="});
    assert_eq!(
        Payload::from_json(&no_charset).unwrap().charset,
        "ASCII-8BIT"
    );
}

#[test]
fn bad_payloads_name_the_field() {
    let err = Payload::from_json(&json!({"encoding": "zip", "value": ""})).unwrap_err();
    assert_eq!(err.path(), "encoding");
    assert!(err.to_string().contains("zip"), "{err}");

    let err = Payload::from_json(&json!({"encoding": "text"})).unwrap_err();
    assert_eq!(err.path(), "value");
    assert!(err.is_missing());

    let bad = Payload::from_json(&json!({"encoding": "binary", "value": "@@@"})).unwrap();
    assert_eq!(bad.decode().unwrap_err().path(), "value");

    let not_gzip =
        Payload::from_json(&json!({"encoding": "gzipped", "value": "aGVsbG8="})).unwrap();
    assert_eq!(not_gzip.decode().unwrap_err().path(), "value");
}

#[test]
fn serde_matches_to_json() {
    let p = Payload::encode(b"abc", Some("text/plain"));
    assert_eq!(serde_json::to_value(&p).unwrap(), p.to_json());
    let back: Payload = serde_json::from_value(p.to_json()).unwrap();
    assert_eq!(back, p);
}

/// Many bodies of many shapes survive encode → JSON text → load → decode.
#[test]
fn random_bodies_round_trip() {
    let mut rng = Rng(42);
    let content_types = [
        None,
        Some("text/plain"),
        Some("application/json"),
        Some("application/octet-stream"),
        Some("text/plain; charset=utf-8"),
    ];
    for i in 0..300 {
        let len = match i % 3 {
            0 => rng.below(64) as usize,
            1 => rng.below(9000) as usize,
            _ => GZIP_THRESHOLD - 2 + rng.below(4) as usize,
        };
        let body: Vec<u8> = if rng.below(2) == 0 {
            (0..len).map(|_| rng.below(256) as u8).collect()
        } else {
            (0..len)
                .map(|_| b"abc \n{}\"\\"[rng.below(9) as usize])
                .collect()
        };
        let ct = content_types[rng.below(content_types.len() as u64) as usize];
        let p = Payload::encode(&body, ct);
        let text = serde_json::to_string(&p).unwrap();
        let loaded: Payload = serde_json::from_str(&text).unwrap();
        assert_eq!(loaded.decode_for(ct).unwrap(), body, "body {i}");
    }
}

#[test]
fn decode_limited_stops_gzip_bombs() {
    let body = "z".repeat(1_000_000);
    let p = Payload::encode(body.as_bytes(), Some("text/plain"));
    assert_eq!(p.encoding, PayloadEncoding::Gzipped);
    assert!(p.value.len() < 5_000);
    let err = p.decode_limited(64 * 1024).unwrap_err();
    assert!(matches!(
        err.kind(),
        patient_wire::WireErrorKind::TooLarge { limit: 65536 }
    ));
    assert_eq!(err.path(), "value");
    assert_eq!(p.decode_limited(1_000_000).unwrap().len(), 1_000_000);
    let small = Payload::encode(b"abc", None);
    assert!(small.decode_limited(2).is_err());
    assert_eq!(small.decode_limited(3).unwrap(), b"abc");
}
