//! The PatientHttp gem's payload encryption, readable and writable here:
//! Active Support's `KeyGenerator` and `MessageEncryptor` with the cipher
//! `aes-256-gcm`, as the gem sets them up for its `encryption_key` setting.
//!
//! Build it with [`Encryptor::active_support`](crate::Encryptor::active_support)
//! (or [`Encryptor::active_support_with`](crate::Encryptor::active_support_with)
//! and [`Options`]); a Ruby process whose PatientHttp configuration has the
//! same `encryption_key` (one key, or an array of keys for rotation) decrypts
//! what this encryptor writes, and this encryptor decrypts what the gem wrote.
//!
//! ```
//! use patient_store::{
//!     activesupport::{KeyDigest, Options, Serializer},
//!     Encryptor,
//! };
//! use serde_json::json;
//!
//! // The gem's `config.encryption_key = ["new key", "old key"]`.
//! let encryptor = Encryptor::active_support(&["new key", "old key"], Serializer::Marshal)?;
//! let payload = json!({"status": 200});
//! let sealed = encryptor.encrypt(&payload)?;
//! assert_eq!(sealed["__encrypted__"], true);
//! assert_eq!(encryptor.decrypt(&sealed)?, payload);
//!
//! // The same in a Rails 7 app, whose `load_defaults` make `KeyGenerator`
//! // derive keys with SHA-256.
//! let rails7 = Encryptor::active_support_with(
//!     &["new key", "old key"],
//!     Options::new().with_key_digest(KeyDigest::Sha256),
//! )?;
//! assert_eq!(rails7.decrypt(&rails7.encrypt(&payload)?)?, payload);
//! # Ok::<(), patient_store::StoreError>(())
//! ```
//!
//! # The format
//!
//! * Each secret gives a 32-byte key by PBKDF2 with the HMAC of a
//!   [`KeyDigest`], [`ITERATIONS`] iterations and the salt [`SALT`]
//!   (`ActiveSupport::KeyGenerator.new(secret).generate_key(SALT, 32)`). The
//!   digest is `KeyGenerator`'s `hash_digest_class`: SHA-1 by default,
//!   SHA-256 in a Rails 7 app (Active Support 6.1 has no such setting and
//!   always uses SHA-1).
//! * The plaintext is the payload's JSON text as the configured
//!   [`Serializer`] wrote it: `Marshal.dump(json)` (Active Support 6.1's
//!   default) or a JSON string literal (`serializer: JSON`).
//! * The message is `base64(ciphertext)--base64(iv)--base64(tag)` (strict
//!   Base64, a random 12-byte IV, a 16-byte tag, no associated data).
//! * The envelope is `{"__encrypted__": true, "value": base64(message)}`:
//!   the gem Base64-encodes the message once more.
//!
//! Rotation: the first secret encrypts, every secret is tried to decrypt.
//! Decryption reads both serializers, whichever is configured. The key
//! digest must be the Ruby side's: a message whose key was derived with the
//! other digest fails with [`StoreError::KeyDigestMismatch`], which names
//! both.

use std::{fmt, num::NonZeroU32, str::FromStr};

use base64::{engine::general_purpose::STANDARD, Engine as _};
use ring::{
    aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN},
    pbkdf2,
    rand::{SecureRandom, SystemRandom},
};

use crate::StoreError;

/// The salt the PatientHttp gem derives its encryption keys with.
pub const SALT: &str = "patient_http_payload_encryption";

/// The PBKDF2 iteration count of Active Support's `KeyGenerator` (2¹⁶).
pub const ITERATIONS: u32 = 1 << 16;

/// The key length, in bytes, of `aes-256-gcm`.
pub const KEY_LEN: usize = 32;

/// The length, in bytes, of a GCM authentication tag.
pub const TAG_LEN: usize = 16;

/// The separator between the parts of a `MessageEncryptor` message.
pub const SEPARATOR: &str = "--";

/// How the JSON text is serialized before encryption: the `serializer:` of
/// the Ruby side's `MessageEncryptor`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Serializer {
    /// Ruby's `Marshal` (Active Support 6.1's default, the gem's): the JSON
    /// text as a marshalled UTF-8 `String`. The default.
    #[default]
    Marshal,
    /// `serializer: JSON`: the JSON text as a JSON string literal. Reading
    /// also takes the `\uXXXX` escapes of a serializer that encodes with
    /// `ActiveSupport::JSON`.
    Json,
}

/// The digest of the HMAC that Active Support's `KeyGenerator` derives keys
/// with by PBKDF2: its `hash_digest_class`.
///
/// Rails 7's `load_defaults` set SHA-256
/// (`config.active_support.key_generator_hash_digest_class`), so the gem in a
/// Rails 7 app derives its keys with SHA-256; older apps and plain Ruby use
/// SHA-1, the default.
///
/// Parsed from and shown as its setting's value: `sha1` or `sha256`.
///
/// ```
/// use patient_store::activesupport::KeyDigest;
///
/// assert_eq!("sha256".parse(), Ok(KeyDigest::Sha256));
/// assert_eq!(KeyDigest::default().to_string(), "sha1");
/// let error = "SHA-512".parse::<KeyDigest>().unwrap_err();
/// assert_eq!(error.to_string(), r#""SHA-512" is not "sha1" or "sha256""#);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KeyDigest {
    /// HMAC-SHA1 (`OpenSSL::Digest::SHA1`): Active Support's own default,
    /// and so the gem's outside Rails 7 apps. The default.
    #[default]
    Sha1,
    /// HMAC-SHA256 (`OpenSSL::Digest::SHA256`): what Rails 7's
    /// `load_defaults` set.
    Sha256,
}

impl KeyDigest {
    /// Every key digest, the default first.
    pub const ALL: &'static [KeyDigest] = &[KeyDigest::Sha1, KeyDigest::Sha256];

    /// Its name as a setting's value: `sha1` or `sha256`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyDigest::Sha1 => "sha1",
            KeyDigest::Sha256 => "sha256",
        }
    }

    /// The Ruby class that `KeyGenerator`'s `hash_digest_class:` takes for it.
    pub fn ruby_class(self) -> &'static str {
        match self {
            KeyDigest::Sha1 => "OpenSSL::Digest::SHA1",
            KeyDigest::Sha256 => "OpenSSL::Digest::SHA256",
        }
    }

    /// The 32-byte key Active Support's `KeyGenerator` derives from `secret`
    /// with this digest and the gem's salt: PBKDF2 with HMAC of this digest,
    /// [`ITERATIONS`] iterations, [`SALT`].
    pub fn derive_key(self, secret: &str) -> [u8; KEY_LEN] {
        let algorithm = match self {
            KeyDigest::Sha1 => pbkdf2::PBKDF2_HMAC_SHA1,
            KeyDigest::Sha256 => pbkdf2::PBKDF2_HMAC_SHA256,
        };
        let mut key = [0u8; KEY_LEN];
        let iterations = NonZeroU32::new(ITERATIONS).unwrap_or(NonZeroU32::MIN);
        pbkdf2::derive(
            algorithm,
            iterations,
            SALT.as_bytes(),
            secret.as_bytes(),
            &mut key,
        );
        key
    }
}

impl fmt::Display for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyDigest {
    type Err = UnknownKeyDigest;

    /// `sha1` or `sha256`, exactly.
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        KeyDigest::ALL
            .iter()
            .copied()
            .find(|digest| digest.as_str() == name)
            .ok_or_else(|| UnknownKeyDigest(name.to_owned()))
    }
}

/// A name that is none of the [`KeyDigest`]s; its message names the allowed
/// values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownKeyDigest(String);

impl UnknownKeyDigest {
    /// The name that was given.
    pub fn name(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UnknownKeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} is not ", self.0)?;
        let last = KeyDigest::ALL.len() - 1;
        for (i, digest) in KeyDigest::ALL.iter().enumerate() {
            match i {
                0 => {}
                i if i == last => f.write_str(" or ")?,
                _ => f.write_str(", ")?,
            }
            write!(f, "\"{digest}\"")?;
        }
        Ok(())
    }
}

impl std::error::Error for UnknownKeyDigest {}

/// How the Ruby side's `MessageEncryptor` and `KeyGenerator` are set up,
/// for [`Encryptor::active_support_with`](crate::Encryptor::active_support_with).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Options {
    /// How the JSON text is serialized; [`Serializer::Marshal`] (the gem's)
    /// by default.
    pub serializer: Serializer,
    /// The digest keys are derived with; [`KeyDigest::Sha1`] by default,
    /// [`KeyDigest::Sha256`] for Rails 7 apps.
    pub key_digest: KeyDigest,
}

impl Options {
    /// The gem's setup outside Rails 7: [`Serializer::Marshal`] and
    /// [`KeyDigest::Sha1`].
    pub fn new() -> Self {
        Options::default()
    }

    /// The serializer; [`Serializer::Marshal`] by default.
    #[must_use]
    pub fn with_serializer(mut self, serializer: Serializer) -> Self {
        self.serializer = serializer;
        self
    }

    /// The key digest; [`KeyDigest::Sha1`] by default.
    #[must_use]
    pub fn with_key_digest(mut self, key_digest: KeyDigest) -> Self {
        self.key_digest = key_digest;
        self
    }
}

/// Keys derived from secrets, and the serializer that writes.
pub(crate) struct ActiveSupport {
    /// The first key encrypts.
    keys: Vec<LessSafeKey>,
    /// The same secrets' keys by each other digest (derived up front, which
    /// doubles the derivation work of a start): only to tell a message
    /// written with another digest from one of an unknown key.
    other_digests: Vec<(KeyDigest, Vec<LessSafeKey>)>,
    options: Options,
    rng: SystemRandom,
}

impl ActiveSupport {
    pub(crate) fn new(secrets: &[impl AsRef<str>], options: Options) -> Result<Self, StoreError> {
        if secrets.is_empty() {
            return Err(StoreError::Config(
                "Active Support encryption needs at least one secret".to_owned(),
            ));
        }
        if let Some(i) = secrets.iter().position(|s| s.as_ref().is_empty()) {
            return Err(StoreError::Config(format!(
                "Active Support encryption secret #{} is empty",
                i + 1
            )));
        }
        let keys = derive_keys(secrets, options.key_digest)?;
        let mut other_digests = Vec::with_capacity(KeyDigest::ALL.len() - 1);
        for &digest in KeyDigest::ALL {
            if digest != options.key_digest {
                other_digests.push((digest, derive_keys(secrets, digest)?));
            }
        }
        Ok(ActiveSupport {
            keys,
            other_digests,
            options,
            rng: SystemRandom::new(),
        })
    }

    pub(crate) fn key_count(&self) -> usize {
        self.keys.len()
    }

    pub(crate) fn options(&self) -> Options {
        self.options
    }

    /// The `MessageEncryptor` message (`b64(ct)--b64(iv)--b64(tag)`) of the
    /// JSON text `json`.
    pub(crate) fn seal(&self, json: &str) -> Result<String, StoreError> {
        let Some(key) = self.keys.first() else {
            return Err(StoreError::Encrypt("no encryption key".to_owned()));
        };
        let mut data = match self.options.serializer {
            Serializer::Marshal => marshal_dump_string(json)?,
            Serializer::Json => serde_json::to_vec(json)
                .map_err(|e| StoreError::Encrypt(format!("cannot serialize the JSON text: {e}")))?,
        };
        let mut iv = [0u8; NONCE_LEN];
        self.rng
            .fill(&mut iv)
            .map_err(|_| StoreError::Encrypt("the random number generator failed".to_owned()))?;
        let tag = key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(iv), Aad::empty(), &mut data)
            .map_err(|_| StoreError::Encrypt("AES-GCM encryption failed".to_owned()))?;
        Ok(format!(
            "{}{SEPARATOR}{}{SEPARATOR}{}",
            STANDARD.encode(&data),
            STANDARD.encode(iv),
            STANDARD.encode(tag.as_ref())
        ))
    }

    /// The JSON text inside the `MessageEncryptor` message `message`, with
    /// every key tried and either serializer read.
    pub(crate) fn open(&self, message: &[u8]) -> Result<String, StoreError> {
        let message = std::str::from_utf8(message).map_err(|_| {
            StoreError::Decrypt("the Active Support message is not text".to_owned())
        })?;
        // Ruby's `split("--")` drops trailing empty parts.
        let mut parts: Vec<&str> = message.split(SEPARATOR).collect();
        while parts.len() > 1 && parts.last() == Some(&"") {
            parts.pop();
        }
        let [ciphertext, iv, tag] = parts.as_slice() else {
            return Err(StoreError::Decrypt(format!(
                "the Active Support message has {} parts separated by {SEPARATOR}; \
                 3 expected (ciphertext, IV, authentication tag)",
                parts.len()
            )));
        };
        let part = |name: &str, text: &str| {
            STANDARD.decode(text).map_err(|e| {
                StoreError::Decrypt(format!(
                    "the {name} of the Active Support message is not valid Base64: {e}"
                ))
            })
        };
        let ciphertext = part("ciphertext", ciphertext)?;
        let iv = part("IV", iv)?;
        let tag = part("authentication tag", tag)?;
        let iv: [u8; NONCE_LEN] = iv.as_slice().try_into().map_err(|_| {
            StoreError::Decrypt(format!(
                "the IV of the Active Support message is {} bytes; {NONCE_LEN} expected",
                iv.len()
            ))
        })?;
        if tag.len() != TAG_LEN {
            return Err(StoreError::Decrypt(format!(
                "the authentication tag of the Active Support message is {} bytes; {TAG_LEN} expected",
                tag.len()
            )));
        }
        let mut sealed = ciphertext;
        sealed.extend_from_slice(&tag);
        if let Some(plain) = open_with(&self.keys, iv, &sealed) {
            return deserialize(&plain);
        }
        // A secret that is configured, with the other digest: the Ruby side's
        // `KeyGenerator` is set up otherwise. Refused all the same.
        for (digest, keys) in &self.other_digests {
            if open_with(keys, iv, &sealed).is_some() {
                return Err(StoreError::KeyDigestMismatch {
                    configured: self.options.key_digest,
                    written_with: *digest,
                });
            }
        }
        Err(StoreError::Decrypt(
            "authentication failed: the Active Support message was encrypted with a key that \
             is not configured, or it was tampered with or truncated"
                .to_owned(),
        ))
    }
}

/// The plaintext of `sealed` (ciphertext and tag) under the first of `keys`
/// that authenticates it.
fn open_with(keys: &[LessSafeKey], iv: [u8; NONCE_LEN], sealed: &[u8]) -> Option<Vec<u8>> {
    keys.iter().find_map(|key| {
        // A failed open may overwrite the buffer: work on a copy.
        let mut buffer = sealed.to_vec();
        let len = key
            .open_in_place(Nonce::assume_unique_for_key(iv), Aad::empty(), &mut buffer)
            .ok()?
            .len();
        buffer.truncate(len);
        Some(buffer)
    })
}

/// The AES-256-GCM key of each secret, derived with `digest`.
fn derive_keys(
    secrets: &[impl AsRef<str>],
    digest: KeyDigest,
) -> Result<Vec<LessSafeKey>, StoreError> {
    secrets
        .iter()
        .enumerate()
        .map(|(i, secret)| {
            UnboundKey::new(&AES_256_GCM, &digest.derive_key(secret.as_ref()))
                .map(LessSafeKey::new)
                .map_err(|_| {
                    StoreError::Config(format!(
                        "cannot make an AES-256-GCM key of encryption secret #{}",
                        i + 1
                    ))
                })
        })
        .collect()
}

/// The 32-byte key Active Support's `KeyGenerator` derives from `secret` with
/// the gem's salt and its default digest:
/// [`KeyDigest::Sha1`]`.`[`derive_key`](KeyDigest::derive_key)`(secret)`.
pub fn derive_key(secret: &str) -> [u8; KEY_LEN] {
    KeyDigest::Sha1.derive_key(secret)
}

/// The JSON text of a decrypted plaintext, whichever serializer wrote it.
fn deserialize(plain: &[u8]) -> Result<String, StoreError> {
    if plain.starts_with(&MARSHAL_VERSION) {
        let bytes = marshal_load_string(plain)?;
        return String::from_utf8(bytes).map_err(|_| {
            StoreError::Decrypt("the marshalled string is not valid UTF-8".to_owned())
        });
    }
    match serde_json::from_slice::<serde_json::Value>(plain) {
        Ok(serde_json::Value::String(json)) => Ok(json),
        Ok(serde_json::Value::Object(object)) if object.contains_key("_rails") => {
            Err(StoreError::Decrypt(
                "the Active Support message carries metadata (purpose or expiry), \
                 which payload encryption does not use"
                    .to_owned(),
            ))
        }
        Ok(_) => Err(StoreError::Decrypt(
            "the JSON-serialized Active Support message is not a string".to_owned(),
        )),
        Err(_) => Err(StoreError::Decrypt(
            "the decrypted Active Support message is neither Marshal nor JSON data".to_owned(),
        )),
    }
}

/// The version Ruby's `Marshal` writes first: 4.8.
const MARSHAL_VERSION: [u8; 2] = [4, 8];

/// `Marshal.dump(text)` of a UTF-8 Ruby `String`: the version, `I"`, the
/// length and the bytes, and the `E` (UTF-8) instance variable set to `true`.
///
/// Fails with [`StoreError::Encrypt`] when the text is longer than Ruby's
/// `Marshal` can write (2³¹ − 1 bytes).
pub fn marshal_dump_string(text: &str) -> Result<Vec<u8>, StoreError> {
    let len = i32::try_from(text.len()).map_err(|_| {
        StoreError::Encrypt(format!(
            "the JSON text is {} bytes; Marshal writes strings of at most {} bytes",
            text.len(),
            i32::MAX
        ))
    })?;
    let mut out = Vec::with_capacity(text.len() + 16);
    out.extend_from_slice(&MARSHAL_VERSION);
    out.extend_from_slice(b"I\"");
    write_long(&mut out, len);
    out.extend_from_slice(text.as_bytes());
    // One instance variable: the symbol `E`, `true` (UTF-8).
    write_long(&mut out, 1);
    out.push(b':');
    write_long(&mut out, 1);
    out.extend_from_slice(b"ET");
    Ok(out)
}

/// The bytes of the Ruby `String` that `data` (`Marshal.dump` output)
/// holds: a plain `"` string, or an `I"` string whose only instance variable
/// is its encoding (`E` true or false, or `encoding` "UTF-8").
///
/// Fails with [`StoreError::Decrypt`] naming what is not such a string.
pub fn marshal_load_string(data: &[u8]) -> Result<Vec<u8>, StoreError> {
    let mut reader = MarshalReader { data, pos: 0 };
    let version = reader.take(2)?;
    if version != MARSHAL_VERSION {
        return Err(marshal_error(format!(
            "version {}.{} (4.8 expected)",
            version[0],
            version.get(1).copied().unwrap_or(0)
        )));
    }
    let with_ivars = match reader.byte()? {
        b'I' => {
            reader.expect_string_type()?;
            true
        }
        b'"' => false,
        other => return Err(not_a_string(other)),
    };
    let len = reader.length()?;
    let bytes = reader.take(len)?.to_vec();
    if with_ivars {
        let count = reader.length()?;
        for _ in 0..count {
            let name = reader.symbol()?;
            match (name, reader.byte()?) {
                (b"E", b'T' | b'F') => {}
                (b"encoding", b'"') => {
                    let len = reader.length()?;
                    let encoding = reader.take(len)?;
                    if !encoding.eq_ignore_ascii_case(b"UTF-8") {
                        return Err(marshal_error(format!(
                            "the string's encoding is {}; only UTF-8 is supported",
                            String::from_utf8_lossy(encoding)
                        )));
                    }
                }
                (name, _) => {
                    return Err(marshal_error(format!(
                        "the string has an instance variable {} that is not its encoding",
                        String::from_utf8_lossy(name)
                    )))
                }
            }
        }
    }
    if reader.pos != data.len() {
        return Err(marshal_error(format!(
            "{} bytes follow the string",
            data.len() - reader.pos
        )));
    }
    Ok(bytes)
}

fn marshal_error(detail: String) -> StoreError {
    StoreError::Decrypt(format!("unsupported Marshal data: {detail}"))
}

fn not_a_string(type_byte: u8) -> StoreError {
    marshal_error(format!(
        "a value of type {:?} where a String was expected; only a String is supported",
        char::from(type_byte)
    ))
}

/// Ruby's `w_long` for a non-negative value below 2³¹.
fn write_long(out: &mut Vec<u8>, value: i32) {
    match value {
        0 => out.push(0),
        1..=122 => out.push(value as u8 + 5),
        _ => {
            let bytes = value.to_le_bytes();
            let used = 4 - bytes.iter().rev().take_while(|&&b| b == 0).count();
            out.push(used as u8);
            out.extend_from_slice(&bytes[..used]);
        }
    }
}

struct MarshalReader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> MarshalReader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], StoreError> {
        let end = self
            .pos
            .checked_add(len)
            .filter(|&end| end <= self.data.len())
            .ok_or_else(|| marshal_error("the data is truncated".to_owned()))?;
        let out = &self.data[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn byte(&mut self) -> Result<u8, StoreError> {
        Ok(self.take(1)?[0])
    }

    fn expect_string_type(&mut self) -> Result<(), StoreError> {
        match self.byte()? {
            b'"' => Ok(()),
            other => Err(not_a_string(other)),
        }
    }

    /// Ruby's `r_long`, for a length or a count (never negative).
    fn length(&mut self) -> Result<usize, StoreError> {
        let c = self.byte()? as i8;
        match c {
            0 => Ok(0),
            5..=127 => Ok((c - 5) as usize),
            1..=4 => {
                let bytes = self.take(c as usize)?;
                Ok(bytes
                    .iter()
                    .rev()
                    .fold(0usize, |acc, &b| (acc << 8) | usize::from(b)))
            }
            _ => Err(marshal_error("a negative length".to_owned())),
        }
    }

    /// A symbol (`:` and its name); links to earlier symbols (`;`) cannot
    /// occur in a lone string.
    fn symbol(&mut self) -> Result<&'a [u8], StoreError> {
        match self.byte()? {
            b':' => {
                let len = self.length()?;
                self.take(len)
            }
            other => Err(marshal_error(format!(
                "an instance variable name of type {:?} (a symbol expected)",
                char::from(other)
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::Encryptor;

    /// Written by Ruby's Active Support 6.1 `MessageEncryptor` as the gem
    /// sets it up, with the key "a gem encryption key", for
    /// `{"known":"answer"}`: Marshal, then `serializer: JSON`.
    const KNOWN_MARSHAL: &str = "N0VKRUgyNG5ycElTckFQOUw0SHhOOExVQVUzcHBKSDZPVVhEOVE9PS0tVDU4aHkrdjRWd21sb1IzRi0tQy8rclJ3U1h1VldzeEhBNUtSbnJQQT09";
    const KNOWN_JSON: &str = "VGFoazFpNDJhWFNaUmI4dVV3T2p1Rk1RVFlqTk1XSDgtLVNRcGN3cFhVclk2OW1kTVAtLUpHU0M0Z0pGZE9UcjRXL1RxZ3ZCTnc9PQ==";
    /// The same, Marshal, with the key that Active Support 7's
    /// `KeyGenerator.new(key, hash_digest_class: OpenSSL::Digest::SHA256)`
    /// derives (a Rails 7 app).
    const KNOWN_SHA256: &str = "OHB0MEZpcmFiVjFRWUhRa3lVbXcwbThQRDNBMEQ0MzY0YUp6K3c9PS0teG5HTGlIdk85cGQzSDAycS0tVzlNYVFPYm82bVdWR3lJT2tIVGM3QT09";

    fn with_digest(secrets: &[&str], key_digest: KeyDigest) -> Encryptor {
        Encryptor::active_support_with(secrets, Options::new().with_key_digest(key_digest)).unwrap()
    }

    #[test]
    fn a_known_sha256_message_decrypts_and_names_the_digest_when_read_as_sha1() {
        let sealed = json!({"__encrypted__": true, "value": KNOWN_SHA256});
        let sha256 = with_digest(&["another key", "a gem encryption key"], KeyDigest::Sha256);
        assert_eq!(sha256.decrypt(&sealed).unwrap(), json!({"known": "answer"}));
        let sha1 = with_digest(&["another key", "a gem encryption key"], KeyDigest::Sha1);
        let error = sha1.decrypt(&sealed).unwrap_err();
        assert!(
            matches!(
                error,
                StoreError::KeyDigestMismatch {
                    configured: KeyDigest::Sha1,
                    written_with: KeyDigest::Sha256
                }
            ),
            "{error:?}"
        );
        assert_eq!(
            error.to_string(),
            "cannot decrypt payload: the Active Support message was encrypted with a key \
             derived with sha256 (KeyGenerator's hash_digest_class: OpenSSL::Digest::SHA256), \
             but the configured key digest is sha1; set the key digest to sha256"
        );
        // The SHA-1 messages, read as SHA-256: the other way round.
        for known in [KNOWN_MARSHAL, KNOWN_JSON] {
            let sealed = json!({"__encrypted__": true, "value": known});
            assert!(matches!(
                sha256.decrypt(&sealed),
                Err(StoreError::KeyDigestMismatch {
                    configured: KeyDigest::Sha256,
                    written_with: KeyDigest::Sha1
                })
            ));
        }
        // Neither digest of a configured secret: an unknown key.
        let other = with_digest(&["another key"], KeyDigest::Sha1);
        assert!(
            matches!(other.decrypt(&sealed), Err(StoreError::Decrypt(m)) if m.contains("authentication failed"))
        );
    }

    #[test]
    fn key_digests_parse_from_their_names_only() {
        for &digest in KeyDigest::ALL {
            assert_eq!(digest.as_str().parse(), Ok(digest));
            assert_eq!(digest.to_string(), digest.as_str());
        }
        assert_eq!(KeyDigest::default(), KeyDigest::Sha1);
        assert_eq!(Options::default().key_digest, KeyDigest::Sha1);
        assert_eq!(Options::default().serializer, Serializer::Marshal);
        for name in [
            "", "SHA256", "Sha1", "sha-256", " sha256", "sha256\n", "sha512", "md5",
        ] {
            let error = name.parse::<KeyDigest>().unwrap_err();
            assert_eq!(error.name(), name);
            assert_eq!(
                error.to_string(),
                format!("{name:?} is not \"sha1\" or \"sha256\"")
            );
        }
    }

    #[test]
    fn known_ruby_messages_decrypt() {
        for serializer in [Serializer::Marshal, Serializer::Json] {
            let encryptor =
                Encryptor::active_support(&["another key", "a gem encryption key"], serializer)
                    .unwrap();
            for known in [KNOWN_MARSHAL, KNOWN_JSON] {
                let sealed = json!({"__encrypted__": true, "value": known});
                assert_eq!(
                    encryptor.decrypt(&sealed).unwrap(),
                    json!({"known": "answer"})
                );
            }
        }
    }

    #[test]
    fn round_trip_rotation_and_serializers() {
        let old = Encryptor::active_support(&["old"], Serializer::Marshal).unwrap();
        let rotated = Encryptor::active_support(&["new", "old"], Serializer::Json).unwrap();
        let value = json!({"status": 200, "body": "ünïcødé"});
        let before = old.encrypt(&value).unwrap();
        assert_eq!(rotated.decrypt(&before).unwrap(), value);
        let after = rotated.encrypt(&value).unwrap();
        assert_eq!(rotated.decrypt(&after).unwrap(), value);
        assert!(
            matches!(old.decrypt(&after), Err(StoreError::Decrypt(m)) if m.contains("authentication failed"))
        );
        // The message inside the envelope: three strict Base64 parts.
        let message = STANDARD
            .decode(after["value"].as_str().unwrap_or_default())
            .unwrap();
        let message = String::from_utf8(message).unwrap();
        let parts: Vec<&str> = message.split(SEPARATOR).collect();
        assert_eq!(parts.len(), 3);
        assert_eq!(STANDARD.decode(parts[1]).unwrap().len(), NONCE_LEN);
        assert_eq!(STANDARD.decode(parts[2]).unwrap().len(), TAG_LEN);
        // Data written before encryption was switched on loads unchanged.
        assert_eq!(rotated.decrypt(&value).unwrap(), value);
    }

    #[test]
    fn secrets_are_validated_and_not_shown() {
        let none: [&str; 0] = [];
        assert!(matches!(
            Encryptor::active_support(&none, Serializer::Marshal),
            Err(StoreError::Config(m)) if m.contains("at least one secret")
        ));
        assert!(matches!(
            Encryptor::active_support(&["key", ""], Serializer::Marshal),
            Err(StoreError::Config(m)) if m.contains("#2 is empty")
        ));
        let debug = format!(
            "{:?}",
            Encryptor::active_support(&["a secret"], Serializer::Json).unwrap()
        );
        assert!(
            debug.contains("active-support")
                && debug.contains("Json")
                && debug.contains("key_digest: Sha1"),
            "{debug}"
        );
        assert!(!debug.contains("a secret"), "{debug}");
    }

    #[test]
    fn marshal_of_short_and_long_strings() {
        // Marshal.dump("hi") in Ruby.
        assert_eq!(
            marshal_dump_string("hi").unwrap(),
            b"\x04\x08I\"\x07hi\x06:\x06ET"
        );
        assert_eq!(
            marshal_dump_string("").unwrap(),
            b"\x04\x08I\"\x00\x06:\x06ET"
        );
        let header = |len: usize| {
            let dumped = marshal_dump_string(&"a".repeat(len)).unwrap();
            dumped[4..dumped.len() - len - 5].to_vec()
        };
        assert_eq!(header(122), [127]);
        assert_eq!(header(123), [1, 123]);
        assert_eq!(header(255), [1, 255]);
        assert_eq!(header(256), [2, 0, 1]);
        assert_eq!(header(65_536), [3, 0, 0, 1]);
        for len in [0, 1, 122, 123, 255, 256, 65_535, 65_536, 70_000] {
            let text = "é".repeat(len / 2) + &"x".repeat(len % 2);
            let dumped = marshal_dump_string(&text).unwrap();
            assert_eq!(marshal_load_string(&dumped).unwrap(), text.as_bytes());
        }
    }

    #[test]
    fn marshal_variants_and_errors() {
        assert_eq!(marshal_load_string(b"\x04\x08\"\x07hi").unwrap(), b"hi");
        assert_eq!(
            marshal_load_string(b"\x04\x08I\"\x07hi\x06:\x06EF").unwrap(),
            b"hi"
        );
        assert_eq!(
            marshal_load_string(b"\x04\x08I\"\x07hi\x06:\x0dencoding\"\x0aUTF-8").unwrap(),
            b"hi"
        );
        for (data, expected) in [
            (&b"\x04\x09\"\x07hi"[..], "version"),
            (b"\x04\x08i\x07", "only a String"),
            (b"\x04\x08[\x00", "only a String"),
            (b"\x04\x08I:\x07hi", "only a String"),
            (b"\x04\x08\"\x09hi", "truncated"),
            (b"\x04\x08\"\x07hiX", "follow"),
            (b"\x04\x08I\"\x07hi\x06:\x06@a", "not its encoding"),
            (
                b"\x04\x08I\"\x07hi\x06:\x0dencoding\"\x0eShift_JIS",
                "Shift_JIS",
            ),
            (b"\x04\x08\"\xfahi", "negative"),
            (b"\x04", "truncated"),
        ] {
            match marshal_load_string(data) {
                Err(StoreError::Decrypt(message)) => {
                    assert!(message.contains(expected), "{data:?}: {message}")
                }
                other => panic!("{data:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn key_derivation_matches_pbkdf2_hmac_sha1() {
        // OpenSSL::PKCS5.pbkdf2_hmac_sha1("secret", SALT, 2**16, 32), from Ruby.
        let key = derive_key("secret");
        let expected = "1f41f66687a9f1a0529d159f3d870d4fe24c70b7ec149f286345496ef6a26b34";
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, expected);
        assert_ne!(derive_key("secret"), derive_key("secreT"));
        assert_eq!(KeyDigest::Sha1.derive_key("secret"), key);
    }

    #[test]
    fn key_derivation_matches_pbkdf2_hmac_sha256() {
        // OpenSSL::PKCS5.pbkdf2_hmac("secret", SALT, 2**16, 32,
        // OpenSSL::Digest::SHA256.new) from Ruby: what Active Support 7's
        // KeyGenerator with hash_digest_class: OpenSSL::Digest::SHA256 derives.
        let key = KeyDigest::Sha256.derive_key("secret");
        let expected = "13d141c0d163b04407a4cd765d68d3cbd97a4ea6ed423cac0583cb6a6da69bde";
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, expected);
    }
}
