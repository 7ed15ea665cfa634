//! The user name and password of a URL, kept out of every serialized form.
//!
//! A request to `https://user:pass@api.example.com/` keeps only
//! `https://api.example.com/` as its URL, so the credentials never reach its
//! JSON, an outcome's `url` or `redirects`, or an error message. They stay
//! beside the URL in a field that is never serialized, for the engine to send
//! as `Authorization: Basic …` to the request's own origin.

use std::fmt;

use url::Url;

use crate::request::RequestValidationError;

/// The user name and password taken out of a request's URL
/// (`https://user:pass@host/`), percent-decoded.
///
/// Never serialized; `Debug` shows the user name only. Credentials in a URL
/// do not survive a round trip through JSON: persist them as a secret header
/// (`authorization` set to a [`SecretRef`](crate::SecretRef)) instead.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct UrlCredentials {
    username: String,
    password: Option<String>,
}

impl UrlCredentials {
    /// The user name (may be empty when only a password was given, as in
    /// `https://:token@host/`).
    pub fn username(&self) -> &str {
        &self.username
    }

    /// The password, when one was given.
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// Removes the user name and password from `url`, returning them; `None`
    /// when it had neither.
    pub(crate) fn take_from(url: &mut Url) -> Result<Option<Self>, RequestValidationError> {
        if url.username().is_empty() && url.password().is_none() {
            return Ok(None);
        }
        let username = percent_decode(url.username())?;
        let password = url.password().map(percent_decode).transpose()?;
        // Neither fails for an http(s) URL, which always has a host.
        let _ = url.set_username("");
        let _ = url.set_password(None);
        Ok(Some(Self { username, password }))
    }
}

impl fmt::Debug for UrlCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UrlCredentials")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// `%XX` sequences decoded; the result must be UTF-8.
fn percent_decode(text: &str) -> Result<String, RequestValidationError> {
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .map(|decoded| decoded.into_owned())
        .map_err(|_| RequestValidationError::InvalidUrlCredentials)
}

/// `text` with any user name and password of its authority replaced by
/// `***`, for error messages about a URL that does not parse.
pub(crate) fn redact_userinfo(text: &str) -> String {
    let authority_start = text.find("://").map_or(0, |i| i + 3);
    let rest = &text[authority_start..];
    let authority_len = rest.find(['/', '?', '#', '\\']).unwrap_or(rest.len());
    match rest[..authority_len].rfind('@') {
        Some(at) => format!(
            "{}***{}",
            &text[..authority_start],
            &text[authority_start + at..]
        ),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_decoded_credentials_out_of_the_url() {
        let mut url = Url::parse("https://us%40er:p%3Ass%20w@h.example:8443/p?q#f").unwrap();
        let creds = UrlCredentials::take_from(&mut url).unwrap().unwrap();
        assert_eq!(url.as_str(), "https://h.example:8443/p?q#f");
        assert_eq!(creds.username(), "us@er");
        assert_eq!(creds.password(), Some("p:ss w"));
        assert_eq!(
            format!("{creds:?}"),
            r#"UrlCredentials { username: "us@er", password: Some("<redacted>") }"#
        );

        let mut url = Url::parse("http://:token@h/").unwrap();
        let creds = UrlCredentials::take_from(&mut url).unwrap().unwrap();
        assert_eq!((creds.username(), creds.password()), ("", Some("token")));
        assert_eq!(url.as_str(), "http://h/");

        let mut url = Url::parse("http://h/").unwrap();
        assert_eq!(UrlCredentials::take_from(&mut url).unwrap(), None);

        let mut url = Url::parse("http://u:%FF@h/").unwrap();
        assert_eq!(
            UrlCredentials::take_from(&mut url),
            Err(RequestValidationError::InvalidUrlCredentials)
        );
    }

    #[test]
    fn redacts_userinfo_of_unparsable_urls() {
        assert_eq!(
            redact_userinfo("http://user:pass@h:99999/x@y"),
            "http://***@h:99999/x@y"
        );
        assert_eq!(redact_userinfo("user:pass@h"), "***@h");
        assert_eq!(redact_userinfo("http://h/a@b"), "http://h/a@b");
        assert_eq!(redact_userinfo("not a url"), "not a url");
    }
}
