//! Standard Webhooks signing secrets (`whsec_` + Base64 of the key bytes)
//! and signatures (`v1,` + Base64 HMAC-SHA256 over `id.timestamp.body`).

use base64::{engine::general_purpose::STANDARD, Engine as _};
use ring::{hmac, rand::SecureRandom};

/// The prefix of a signing secret.
pub const PREFIX: &str = "whsec_";

/// The key bytes of a `whsec_…` secret, or why it is not one.
pub fn decode(secret: &str) -> Result<Vec<u8>, String> {
    let Some(encoded) = secret.strip_prefix(PREFIX) else {
        return Err(format!("must start with {PREFIX} followed by Base64"));
    };
    let key = STANDARD
        .decode(encoded)
        .map_err(|_| format!("the part after {PREFIX} is not Base64"))?;
    if !(24..=64).contains(&key.len()) {
        return Err(format!(
            "the key is {} bytes; use 24 to 64 (32 is usual)",
            key.len()
        ));
    }
    Ok(key)
}

/// A new random 32-byte secret, `whsec_…`.
pub fn generate() -> Result<String, String> {
    let mut key = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut key)
        .map_err(|_| "the system's random source failed".to_owned())?;
    Ok(format!("{PREFIX}{}", STANDARD.encode(key)))
}

/// The `webhook-signature` header value of a message.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut context = hmac::Context::with_key(&key);
    context.update(id.as_bytes());
    context.update(b".");
    context.update(timestamp.to_string().as_bytes());
    context.update(b".");
    context.update(body);
    format!("v1,{}", STANDARD.encode(context.sign().as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_the_standard_webhooks_example() {
        // The example of the Standard Webhooks specification.
        let key = decode("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let signature = sign(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn generated_secrets_decode() {
        let secret = generate().unwrap();
        assert_eq!(decode(&secret).unwrap().len(), 32);
        assert!(decode("whsec_!!").is_err());
        assert!(decode("abc").unwrap_err().contains("whsec_"));
    }
}
