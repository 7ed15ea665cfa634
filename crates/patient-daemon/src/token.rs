//! The daemon's API token: where a caller presents it and how it is
//! compared. The API (`/v1`, `/metrics`, the dashboard) and the proxy routes
//! whose `auth` is `api_token` use this one module, so both accept the same
//! spellings and compare the same way.
//!
//! * **Presenting.** `Authorization: Bearer TOKEN`, the scheme in any case
//!   (`bearer`, `BEARER`); on proxy routes `x-api-key: TOKEN` too. Every
//!   token a request presents must be the daemon's: a request presenting a
//!   wrong one beside the right one (a repeated field, or both fields) is
//!   refused, so no two readers of the same request can disagree on who
//!   sent it.
//! * **Comparing.** Both sides are reduced to an HMAC-SHA256 tag under a key
//!   drawn at random once per process, and the tags are compared by
//!   [`ring::hmac::verify`], in constant time. The time taken tells nothing
//!   of how much of the token matched, nor of its length: a prefix or an
//!   extension of the token costs what any other wrong value costs.
//!
//! ```
//! use http::{HeaderMap, HeaderValue};
//! use patient_daemon::token::{ApiToken, Places};
//!
//! let token = ApiToken::new("s3cret");
//! let mut headers = HeaderMap::new();
//! headers.insert("authorization", HeaderValue::from_static("bearer s3cret"));
//! assert!(token.admits(&headers, Places::Authorization).is_ok());
//! assert!(!token.matches(b"s3cre"));
//! ```

use std::sync::OnceLock;

use http::{header, HeaderMap, HeaderName};
use ring::{hmac, rand::SecureRandom};

/// The header a proxy route also takes the token from.
pub const API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// Where a request may present the token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Places {
    /// `Authorization: Bearer TOKEN` only (the API).
    Authorization,
    /// `Authorization: Bearer TOKEN` or `x-api-key: TOKEN` (proxy routes:
    /// the two ways LLM SDKs send their key).
    AuthorizationOrApiKey,
}

/// Why a request was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenRefusal {
    /// The request presents no token.
    #[error("no token was presented")]
    Missing,
    /// A token the request presents is not the daemon's.
    #[error("the token presented is not the daemon's")]
    Wrong,
}

impl TokenRefusal {
    /// Whether the request presented no token at all.
    pub fn is_missing(&self) -> bool {
        matches!(self, TokenRefusal::Missing)
    }
}

/// The daemon's API token, kept as a tag to compare against. Its `Debug`
/// shows nothing of it.
#[derive(Clone)]
pub struct ApiToken {
    tag: hmac::Tag,
}

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiToken(<hidden>)")
    }
}

impl ApiToken {
    /// The token `token`.
    pub fn new(token: &str) -> ApiToken {
        ApiToken {
            tag: hmac::sign(key(), token.as_bytes()),
        }
    }

    /// Whether `given` is the token, compared in constant time whatever
    /// the lengths of both.
    pub fn matches(&self, given: &[u8]) -> bool {
        hmac::verify(key(), given, self.tag.as_ref()).is_ok()
    }

    /// Admits a request whose `headers` present this token in `places`: at
    /// least one token presented, and every one presented is this one.
    pub fn admits(&self, headers: &HeaderMap, places: Places) -> Result<(), TokenRefusal> {
        let mut presented = false;
        for given in presented_tokens(headers, places) {
            presented = true;
            if !self.matches(given) {
                return Err(TokenRefusal::Wrong);
            }
        }
        if presented {
            Ok(())
        } else {
            Err(TokenRefusal::Missing)
        }
    }
}

/// The tokens `headers` present in `places`: the credentials of each
/// `Authorization` field whose scheme is `Bearer` (in any case), then each
/// `x-api-key` field where `places` takes it. Other schemes (`Basic …`)
/// present no token.
pub fn presented_tokens(headers: &HeaderMap, places: Places) -> impl Iterator<Item = &[u8]> {
    let api_keys = match places {
        Places::Authorization => None,
        Places::AuthorizationOrApiKey => Some(headers.get_all(API_KEY)),
    };
    headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .filter_map(|value| bearer_credentials(value.as_bytes()))
        .chain(
            api_keys
                .into_iter()
                .flatten()
                .map(|value| value.as_bytes().trim_ascii()),
        )
}

/// The credentials of an `Authorization` value with the `Bearer` scheme
/// (RFC 9110 §11.4: the scheme is case-insensitive, one or more spaces
/// follow it).
pub fn bearer_credentials(value: &[u8]) -> Option<&[u8]> {
    let value = value.trim_ascii();
    let split = value.iter().position(|b| *b == b' ' || *b == b'\t')?;
    let (scheme, rest) = value.split_at(split);
    scheme
        .eq_ignore_ascii_case(b"bearer")
        .then(|| rest.trim_ascii())
}

/// The process's comparison key: random, drawn once. Nothing depends on
/// its secrecy beyond the comparison itself (the tags are compared in
/// constant time); a source of randomness that fails falls back to a
/// weaker one rather than to no key.
fn key() -> &'static hmac::Key {
    static KEY: OnceLock<hmac::Key> = OnceLock::new();
    KEY.get_or_init(|| {
        let mut bytes = [0u8; 32];
        if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
            for chunk in bytes.chunks_mut(8) {
                chunk.copy_from_slice(&fastrand::u64(..).to_le_bytes());
            }
        }
        hmac::Key::new(hmac::HMAC_SHA256, &bytes)
    })
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn headers(fields: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in fields {
            h.append(*n, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn comparison_needs_every_byte_and_the_same_length() {
        let token = ApiToken::new("secret");
        assert!(token.matches(b"secret"));
        for wrong in [
            &b"secreT"[..],
            b"secret1",
            b"secre",
            b"",
            b"secretsecret",
            b"SECRET",
        ] {
            assert!(!token.matches(wrong), "{wrong:?}");
        }
    }

    #[test]
    fn the_bearer_scheme_is_read_in_any_case() {
        for value in [
            "Bearer t",
            "bearer t",
            "BEARER t",
            "bEaReR  t",
            "Bearer\tt",
            " Bearer t ",
        ] {
            assert_eq!(
                bearer_credentials(value.as_bytes()),
                Some(&b"t"[..]),
                "{value:?}"
            );
        }
        for value in ["Basic dDp0", "Bearert", "Bearer", "Token t", "t"] {
            assert_eq!(bearer_credentials(value.as_bytes()), None, "{value:?}");
        }
    }

    #[test]
    fn every_token_presented_must_be_the_token() {
        let token = ApiToken::new("t0k");
        let api = Places::Authorization;
        let route = Places::AuthorizationOrApiKey;
        assert_eq!(
            token.admits(&headers(&[("authorization", "Bearer t0k")]), api),
            Ok(())
        );
        assert_eq!(
            token.admits(&headers(&[("x-api-key", "t0k")]), route),
            Ok(())
        );
        // The API does not read x-api-key.
        assert_eq!(
            token.admits(&headers(&[("x-api-key", "t0k")]), api),
            Err(TokenRefusal::Missing)
        );
        assert_eq!(
            token.admits(&headers(&[]), route),
            Err(TokenRefusal::Missing)
        );
        assert_eq!(
            token.admits(&headers(&[("authorization", "Basic dDBr")]), route),
            Err(TokenRefusal::Missing)
        );
        for fields in [
            &[("authorization", "Bearer t0")][..],
            &[("authorization", "Bearer t0kk")],
            &[
                ("authorization", "Bearer wrong"),
                ("authorization", "Bearer t0k"),
            ],
            &[
                ("authorization", "Bearer t0k"),
                ("authorization", "Bearer wrong"),
            ],
            &[("authorization", "Bearer t0k"), ("x-api-key", "wrong")],
            &[("x-api-key", "t0k"), ("x-api-key", "")],
        ] {
            assert_eq!(
                token.admits(&headers(fields), route),
                Err(TokenRefusal::Wrong),
                "{fields:?}"
            );
        }
        assert_eq!(
            token.admits(
                &headers(&[("authorization", "bearer t0k"), ("x-api-key", "t0k")]),
                route
            ),
            Ok(())
        );
    }

    #[test]
    fn debug_hides_the_token() {
        assert_eq!(format!("{:?}", ApiToken::new("t0k")), "ApiToken(<hidden>)");
    }
}
