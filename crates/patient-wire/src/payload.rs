//! Bodies as JSON: text, gzipped text, or Base64 binary.

use std::{
    borrow::Cow,
    io::{Read, Write},
};

use base64::{
    alphabet,
    engine::{general_purpose, DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig},
    Engine as _,
};
use encoding_rs::Encoding;
use flate2::{read::MultiGzDecoder, write::GzEncoder, Compression};
use serde_json::{Map, Value};

use crate::{
    fields::{serde_via_json, Fields},
    limits::{Bound, LimitError, WireLimits},
    wire_error::{WireError, WireErrorKind},
};

/// Text of this many bytes or more is gzipped when that makes it smaller.
pub const GZIP_THRESHOLD: usize = 4096;

/// The `charset` written for text: text is always stored as UTF-8.
pub const TEXT_CHARSET: &str = "UTF-8";

/// The `charset` written for binary payloads (the Ruby name for raw bytes).
pub const BINARY_CHARSET: &str = "ASCII-8BIT";

/// Decodes Base64 with or without padding and ignores line breaks, as the
/// Ruby loader does; encoding always uses [`general_purpose::STANDARD`].
const LENIENT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// How a [`Payload`] stores its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PayloadEncoding {
    /// `"text"`: the value is the text itself.
    Text,
    /// `"gzipped"`: the value is the gzip of the text, in Base64.
    Gzipped,
    /// `"binary"`: the value is the bytes, in Base64.
    Binary,
}

impl PayloadEncoding {
    const NAMES: &'static [&'static str] = &["text", "gzipped", "binary"];

    /// The wire name: `"text"`, `"gzipped"` or `"binary"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            PayloadEncoding::Text => "text",
            PayloadEncoding::Gzipped => "gzipped",
            PayloadEncoding::Binary => "binary",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        match name {
            "text" => Some(PayloadEncoding::Text),
            "gzipped" => Some(PayloadEncoding::Gzipped),
            "binary" => Some(PayloadEncoding::Binary),
            _ => None,
        }
    }
}

/// A body as JSON: `{"encoding": .., "value": .., "charset": ..}`.
///
/// [`Payload::encode`] applies the rules of the wire format:
///
/// * a body is text when its content type starts with `text/` or contains
///   `application/json`, `application/xml` or `application/javascript`
///   ([`is_text_content_type`]); otherwise it is binary;
/// * text is stored as UTF-8: transcoded from a known `charset=` parameter,
///   kept as is without one; text that does not decode as declared (or is not
///   UTF-8 when nothing is declared) is stored as binary so no byte is lost;
/// * text under [`GZIP_THRESHOLD`] bytes is stored as `text`; longer text is
///   gzipped and stored as `gzipped` (Base64) only when the gzip is smaller;
/// * binary is stored as `binary`, standard Base64 without line breaks,
///   charset `ASCII-8BIT`.
///
/// A missing body is JSON `null`, not a payload.
///
/// Decoding is bounded: [`Payload::decode`] and every loader of a body
/// refuse a payload that decodes to more than [`WireLimits::max_body_size`]
/// bytes, and a `gzipped` value is inflated through a reader that stops one
/// byte past the bound, so a small value that would inflate to gigabytes
/// costs no more than the bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    /// How `value` stores the bytes.
    pub encoding: PayloadEncoding,
    /// The text, or the Base64 of the gzip or of the bytes.
    pub value: String,
    /// The character set of the stored text (`UTF-8`), or `ASCII-8BIT` for
    /// binary.
    pub charset: String,
}

impl Payload {
    /// Encodes a body given its content type.
    pub fn encode(body: &[u8], content_type: Option<&str>) -> Payload {
        if let Some(ct) = content_type.filter(|ct| is_text_content_type(ct)) {
            if let Some(text) = decode_declared(body, ct) {
                return Payload::text(&text);
            }
        }
        Payload::binary(body)
    }

    /// Stores text: as `text` below [`GZIP_THRESHOLD`] bytes, otherwise as
    /// `gzipped` when the gzip output is smaller than the text.
    pub fn text(text: &str) -> Payload {
        if text.len() >= GZIP_THRESHOLD {
            if let Some(gz) = gzip(text.as_bytes()).filter(|gz| gz.len() < text.len()) {
                return Payload {
                    encoding: PayloadEncoding::Gzipped,
                    value: general_purpose::STANDARD.encode(gz),
                    charset: TEXT_CHARSET.to_owned(),
                };
            }
        }
        Payload {
            encoding: PayloadEncoding::Text,
            value: text.to_owned(),
            charset: TEXT_CHARSET.to_owned(),
        }
    }

    /// Stores bytes as `binary`: standard Base64 without line breaks.
    pub fn binary(bytes: &[u8]) -> Payload {
        Payload {
            encoding: PayloadEncoding::Binary,
            value: general_purpose::STANDARD.encode(bytes),
            charset: BINARY_CHARSET.to_owned(),
        }
    }

    /// Whether this payload holds text (`text` or `gzipped`).
    pub fn is_text(&self) -> bool {
        self.encoding != PayloadEncoding::Binary
    }

    /// The stored bytes: the text as UTF-8 for `text` and `gzipped`, the exact
    /// bytes that went in for `binary`.
    ///
    /// Fails with [`WireErrorKind::Limit`] rather than produce more than
    /// [`WireLimits::max_body_size`] of the default limits: a gzipped value
    /// stops inflating as soon as it passes the bound.
    pub fn decode(&self) -> Result<Vec<u8>, WireError> {
        self.decode_with_limits(&WireLimits::default())
    }

    /// Like [`Payload::decode`], within [`WireLimits::max_body_size`] of
    /// `limits`.
    pub fn decode_with_limits(&self, limits: &WireLimits) -> Result<Vec<u8>, WireError> {
        let max = limits.max_body_size;
        self.decode_capped(Cap::Limits(max), max, "")
    }

    /// The body as it was on the wire of HTTP: like [`Payload::decode`], but
    /// text stored as UTF-8 is encoded back into the charset the content type
    /// declares (say `ISO-8859-1`), so that encoding the result again with the
    /// same content type gives the same payload. Text that charset cannot
    /// represent is returned as UTF-8. The result too is within
    /// [`WireLimits::max_body_size`] of the default limits.
    pub fn decode_for(&self, content_type: Option<&str>) -> Result<Vec<u8>, WireError> {
        self.decode_for_with_limits(content_type, &WireLimits::default())
    }

    /// Like [`Payload::decode_for`], within [`WireLimits::max_body_size`] of
    /// `limits`.
    pub fn decode_for_with_limits(
        &self,
        content_type: Option<&str>,
        limits: &WireLimits,
    ) -> Result<Vec<u8>, WireError> {
        self.decode_for_at(content_type, "", limits.max_body_size)
    }

    pub(crate) fn decode_for_at(
        &self,
        content_type: Option<&str>,
        path: &str,
        max_body_size: usize,
    ) -> Result<Vec<u8>, WireError> {
        let cap = Cap::Limits(max_body_size);
        let target = content_type.and_then(declared_encoding).filter(|&target| {
            target != encoding_rs::UTF_8 && self.is_text() && is_utf8_label(&self.charset)
        });
        let Some(target) = target else {
            return self.decode_capped(cap, max_body_size, path);
        };
        // Text is stored as UTF-8, which takes up to twice the bytes of the
        // charset it goes back into (`é` is one byte of ISO-8859-1): what
        // counts is the size once encoded back.
        let bytes = self.decode_capped(cap, max_body_size.saturating_mul(2), path)?;
        let bytes = match String::from_utf8(bytes) {
            Ok(text) => encode_into(&text, target).unwrap_or_else(|| text.into_bytes()),
            Err(e) => e.into_bytes(),
        };
        if bytes.len() > max_body_size {
            return Err(cap.error(&crate::fields::join(path, "value"), Some(bytes.len())));
        }
        Ok(bytes)
    }

    /// Like [`Payload::decode`], but fails with [`WireErrorKind::TooLarge`]
    /// rather than produce more than `max_len` bytes (a gzipped value stops
    /// inflating as soon as it passes `max_len`).
    pub fn decode_limited(&self, max_len: usize) -> Result<Vec<u8>, WireError> {
        self.decode_capped(Cap::Len(max_len), max_len, "")
    }

    /// The stored bytes, never more than `max` of them (else `cap`'s error):
    /// text and Base64 are measured before they are copied, gzip is inflated
    /// through [`inflate_capped`], which stops one byte past `max`.
    fn decode_capped(&self, cap: Cap, max: usize, path: &str) -> Result<Vec<u8>, WireError> {
        let value_path = crate::fields::join(path, "value");
        match self.encoding {
            PayloadEncoding::Text => {
                if self.value.len() > max {
                    return Err(cap.error(&value_path, Some(self.value.len())));
                }
                Ok(self.value.as_bytes().to_vec())
            }
            PayloadEncoding::Binary => {
                // Four Base64 characters hold three bytes (less up to two of
                // padding): refuse a value that cannot fit before decoding it.
                if self.value.len() / 4 * 3 > max {
                    let compact = self
                        .value
                        .bytes()
                        .filter(|b| !b.is_ascii_whitespace())
                        .count();
                    if (compact / 4 * 3).saturating_sub(2) > max {
                        return Err(cap.error(&value_path, None));
                    }
                }
                let bytes = base64_decode(&self.value, &value_path)?;
                if bytes.len() > max {
                    return Err(cap.error(&value_path, Some(bytes.len())));
                }
                Ok(bytes)
            }
            PayloadEncoding::Gzipped => {
                let gz = base64_decode(&self.value, &value_path)?;
                match inflate_capped(MultiGzDecoder::new(gz.as_slice()), max, gz.len()) {
                    Ok(bytes) => Ok(bytes),
                    Err(Inflate::Over) => Err(cap.error(&value_path, None)),
                    Err(Inflate::Io(e)) => {
                        Err(WireError::new(value_path.as_str(), WireErrorKind::Gzip(e)))
                    }
                }
            }
        }
    }

    /// `{"encoding": .., "value": .., "charset": ..}`.
    pub fn to_json(&self) -> Value {
        let mut map = Map::new();
        map.insert("encoding".into(), self.encoding.as_str().into());
        map.insert("value".into(), self.value.clone().into());
        map.insert("charset".into(), self.charset.clone().into());
        Value::Object(map)
    }

    /// Loads a payload object. A missing `charset` means `UTF-8` for text
    /// and `ASCII-8BIT` for binary.
    pub fn from_json(value: &Value) -> Result<Payload, WireError> {
        Self::load(value, "")
    }

    pub(crate) fn load(value: &Value, path: &str) -> Result<Payload, WireError> {
        let fields = Fields::new(value, path)?;
        let name = fields.string("encoding")?;
        let encoding = PayloadEncoding::from_name(name).ok_or_else(|| {
            WireError::new(
                fields.path_of("encoding"),
                WireErrorKind::UnknownValue {
                    value: name.to_owned(),
                    expected: PayloadEncoding::NAMES,
                },
            )
        })?;
        let value = fields.string("value")?.to_owned();
        let charset = match fields.opt_string("charset")? {
            Some(c) => c.to_owned(),
            None if encoding == PayloadEncoding::Binary => BINARY_CHARSET.to_owned(),
            None => TEXT_CHARSET.to_owned(),
        };
        Ok(Payload {
            encoding,
            value,
            charset,
        })
    }
}

serde_via_json!(Payload);

/// The bound a payload is decoded within, and the error for passing it.
#[derive(Debug, Clone, Copy)]
enum Cap {
    /// [`WireLimits::max_body_size`]: a [`WireErrorKind::Limit`].
    Limits(usize),
    /// [`Payload::decode_limited`]: a [`WireErrorKind::TooLarge`].
    Len(usize),
}

impl Cap {
    fn error(self, path: &str, found: Option<usize>) -> WireError {
        match self {
            Cap::Limits(max) => LimitError::new(
                path,
                "max_body_size",
                Bound::Bytes(max),
                found.map(|n| n.to_string()),
            )
            .into(),
            Cap::Len(limit) => WireError::new(path, WireErrorKind::TooLarge { limit }),
        }
    }
}

/// The largest first allocation of [`inflate_capped`]; it grows from there
/// only as the data inflates.
const INFLATE_FIRST_ALLOCATION: usize = 4 << 20;

/// Why [`inflate_capped`] stopped.
#[derive(Debug)]
enum Inflate {
    /// The data does not decompress.
    Io(std::io::Error),
    /// It decompresses to more than the cap.
    Over,
}

/// Everything `decoder` gives, as long as that is at most `max` bytes: it is
/// read through [`Read::take`] of `max + 1` bytes, so a gzip bomb is never
/// inflated (nor held) past one byte more than `max`. `hint` (the compressed
/// size) sizes the first allocation, up to [`INFLATE_FIRST_ALLOCATION`].
fn inflate_capped<R: Read>(decoder: R, max: usize, hint: usize) -> Result<Vec<u8>, Inflate> {
    let cap = max.saturating_add(1);
    let mut out = Vec::with_capacity(
        hint.saturating_mul(4)
            .min(cap)
            .min(INFLATE_FIRST_ALLOCATION),
    );
    decoder
        .take(u64::try_from(cap).unwrap_or(u64::MAX))
        .read_to_end(&mut out)
        .map_err(Inflate::Io)?;
    if out.len() > max {
        return Err(Inflate::Over);
    }
    Ok(out)
}

/// Loads an optional body at `key` of `fields`: `null`, an absent key or a
/// payload without a `value` are no body (as the Ruby loader treats
/// them); anything else is decoded for `content_type`, within
/// [`WireLimits::max_body_size`].
pub(crate) fn load_body(
    fields: &Fields<'_>,
    key: &str,
    content_type: Option<&str>,
    limits: &WireLimits,
) -> Result<Option<bytes::Bytes>, WireError> {
    let Some(v) = fields.value(key) else {
        return Ok(None);
    };
    if v.is_object() && v.get("value").is_none_or(Value::is_null) {
        return Ok(None);
    }
    let path = fields.path_of(key);
    let payload = Payload::load(v, &path)?;
    payload
        .decode_for_at(content_type, &path, limits.max_body_size)
        .map(|b| Some(b.into()))
}

/// Whether a body of this content type is text: it starts with `text/` or
/// contains `application/json`, `application/xml` or `application/javascript`
/// (ignoring case).
pub fn is_text_content_type(content_type: &str) -> bool {
    let ct = content_type.trim_start().to_ascii_lowercase();
    ct.starts_with("text/")
        || ct.contains("application/json")
        || ct.contains("application/xml")
        || ct.contains("application/javascript")
}

/// The value of the `charset` parameter of a content type, unquoted.
pub fn charset_param(content_type: &str) -> Option<&str> {
    content_type.split(';').skip(1).find_map(|param| {
        let (name, value) = param.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("charset")
            .then(|| value.trim().trim_matches('"').trim())
            .filter(|v| !v.is_empty())
    })
}

/// The encoding a content type declares, when its `charset` is a known label.
pub(crate) fn declared_encoding(content_type: &str) -> Option<&'static Encoding> {
    charset_param(content_type).and_then(|label| Encoding::for_label(label.as_bytes()))
}

/// The text of a body: decoded from the declared charset, or UTF-8 when none
/// (or an unknown one) is declared. `None` when the bytes do not decode.
fn decode_declared<'a>(body: &'a [u8], content_type: &str) -> Option<Cow<'a, str>> {
    match declared_encoding(content_type) {
        Some(enc) => enc.decode_without_bom_handling_and_without_replacement(body),
        None => std::str::from_utf8(body).ok().map(Cow::Borrowed),
    }
}

/// Text encoded into `target`, `None` when `target` cannot represent it.
fn encode_into(text: &str, target: &'static Encoding) -> Option<Vec<u8>> {
    if target == encoding_rs::UTF_16LE {
        return Some(text.encode_utf16().flat_map(u16::to_le_bytes).collect());
    }
    if target == encoding_rs::UTF_16BE {
        return Some(text.encode_utf16().flat_map(u16::to_be_bytes).collect());
    }
    if target.output_encoding() != target {
        return None;
    }
    let (bytes, used, had_errors) = target.encode(text);
    (used == target && !had_errors).then(|| bytes.into_owned())
}

fn is_utf8_label(charset: &str) -> bool {
    charset.eq_ignore_ascii_case("UTF-8") || charset.eq_ignore_ascii_case("UTF8")
}

fn gzip(bytes: &[u8]) -> Option<Vec<u8>> {
    let mut encoder = GzEncoder::new(Vec::with_capacity(bytes.len() / 2), Compression::default());
    encoder.write_all(bytes).ok()?;
    encoder.finish().ok()
}

fn base64_decode(value: &str, path: &str) -> Result<Vec<u8>, WireError> {
    let result = if value.bytes().any(|b| b.is_ascii_whitespace()) {
        let compact: Vec<u8> = value.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        LENIENT_BASE64.decode(compact)
    } else {
        LENIENT_BASE64.decode(value)
    };
    result.map_err(|e| WireError::new(path, WireErrorKind::Base64(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_content_types() {
        assert!(is_text_content_type("text/html; charset=utf-8"));
        assert!(is_text_content_type("application/json"));
        assert!(is_text_content_type("application/xml"));
        assert!(is_text_content_type("application/javascript"));
        assert!(is_text_content_type("Application/JSON"));
        assert!(!is_text_content_type("application/octet-stream"));
        assert!(!is_text_content_type("image/png"));
    }

    #[test]
    fn charset_parameter() {
        assert_eq!(
            charset_param("text/plain; charset=ISO-8859-1"),
            Some("ISO-8859-1")
        );
        assert_eq!(charset_param("text/plain;Charset=\"utf-8\""), Some("utf-8"));
        assert_eq!(charset_param("text/plain"), None);
        assert_eq!(charset_param("text/plain; charset="), None);
    }

    #[test]
    fn base64_decoding_is_lenient_about_line_breaks_and_padding() {
        assert_eq!(base64_decode("aGVs\nbG8=", "v").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVsbG8", "v").unwrap(), b"hello");
        assert_eq!(
            base64_decode("!!", "body.value").unwrap_err().path(),
            "body.value"
        );
    }

    /// Endless zeros, counting what was read.
    struct Endless {
        read: usize,
    }

    impl Read for Endless {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            buf.fill(0);
            self.read += buf.len();
            Ok(buf.len())
        }
    }

    #[test]
    fn inflating_stops_one_byte_past_the_cap() {
        let mut endless = Endless { read: 0 };
        let result = inflate_capped(&mut endless, 1000, 10);
        assert!(matches!(result, Err(Inflate::Over)), "{result:?}");
        assert_eq!(endless.read, 1001, "never more than the cap and one byte");

        let exact = inflate_capped(&[7_u8; 1000][..], 1000, 10).unwrap();
        assert_eq!(exact.len(), 1000);
        let capacity = inflate_capped(&[7_u8; 10][..], usize::MAX, usize::MAX).unwrap();
        assert_eq!(capacity.len(), 10);
    }

    #[test]
    fn utf16_is_re_encoded_by_hand() {
        let payload = Payload::encode(&[0x68, 0, 0x69, 0], Some("text/plain; charset=utf-16le"));
        assert_eq!(payload.value, "hi");
        assert_eq!(
            payload
                .decode_for(Some("text/plain; charset=utf-16le"))
                .unwrap(),
            vec![0x68, 0, 0x69, 0]
        );
    }
}
