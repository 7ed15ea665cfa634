//! The `endpoint` label: a request's method and its path reduced to a
//! template, so `GET /users/42` and `GET /users/43` count as one endpoint.
//!
//! A path matching one of the templates an application registered
//! ([`Metrics::set_endpoint_templates`](super::Metrics::set_endpoint_templates))
//! takes that template. Any other path is normalised segment by segment: a
//! segment that looks like an identifier becomes `{id}` (all digits; a UUID;
//! 16 or more hexadecimal digits; 20 or more characters mixing letters and
//! digits; anything over 64 bytes), and a path deeper than
//! [`MAX_SEGMENTS`] segments ends in `/…`. The query is never part of it.
//! The number of distinct labels is capped as well (see
//! [`DEFAULT_MAX_ENDPOINT_LABELS`](super::DEFAULT_MAX_ENDPOINT_LABELS)).

use std::fmt::Write;

/// Segments kept by the automatic normalisation; deeper paths end in `/…`.
pub const MAX_SEGMENTS: usize = 6;

/// A path template: literal segments, `{name}` for any one segment and a
/// final `*` for any rest (`/v1/users/{id}/posts`, `/files/*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PathTemplate {
    text: String,
    segments: Vec<TemplateSegment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TemplateSegment {
    Literal(String),
    Any,
    Rest,
}

/// Why a path template was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid endpoint template {template:?}: {reason}")]
pub struct InvalidEndpointTemplate {
    template: String,
    reason: &'static str,
}

impl InvalidEndpointTemplate {
    /// The template as given.
    pub fn template(&self) -> &str {
        &self.template
    }

    /// What is wrong with it.
    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

impl PathTemplate {
    pub(crate) fn parse(text: &str) -> Result<Self, InvalidEndpointTemplate> {
        let fail = |reason| InvalidEndpointTemplate {
            template: text.to_owned(),
            reason,
        };
        if !text.starts_with('/') {
            return Err(fail("it must start with '/'"));
        }
        if text.contains(['?', '#']) {
            return Err(fail("a query or fragment is never part of an endpoint"));
        }
        let parts: Vec<&str> = segments(text).collect();
        let mut out = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            out.push(if *part == "*" {
                if i + 1 != parts.len() {
                    return Err(fail("'*' may only be the last segment"));
                }
                TemplateSegment::Rest
            } else if part.starts_with('{') && part.ends_with('}') && part.len() > 2 {
                TemplateSegment::Any
            } else if part.contains(['{', '}', '*']) {
                return Err(fail(
                    "a placeholder is a whole segment: {name}, or '*' at the end",
                ));
            } else {
                TemplateSegment::Literal((*part).to_owned())
            });
        }
        Ok(PathTemplate {
            text: text.to_owned(),
            segments: out,
        })
    }

    fn matches(&self, path: &str) -> bool {
        let mut parts = segments(path);
        for segment in &self.segments {
            match segment {
                TemplateSegment::Rest => return true,
                TemplateSegment::Any => {
                    if parts.next().is_none() {
                        return false;
                    }
                }
                TemplateSegment::Literal(literal) => {
                    if parts.next() != Some(literal.as_str()) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }
}

fn segments(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|s| !s.is_empty())
}

/// The `endpoint` label of `method` and `path`: `"GET /users/{id}"`.
pub(crate) fn endpoint_label(method: &str, path: &str, templates: &[PathTemplate]) -> String {
    let path = path.split(['?', '#']).next().unwrap_or("");
    let mut label = String::with_capacity(method.len() + 1 + path.len().min(64));
    label.push_str(method);
    label.push(' ');
    if let Some(template) = templates.iter().find(|t| t.matches(path)) {
        label.push_str(&template.text);
        return label;
    }
    let mut any = false;
    for (i, segment) in segments(path).enumerate() {
        any = true;
        if i == MAX_SEGMENTS {
            label.push_str("/…");
            break;
        }
        label.push('/');
        if looks_like_an_id(segment) {
            label.push_str("{id}");
        } else {
            // Percent-decoding is not needed: the URL's own spelling is stable.
            let _ = write!(label, "{segment}");
        }
    }
    if !any {
        label.push('/');
    }
    label
}

fn looks_like_an_id(segment: &str) -> bool {
    let bytes = segment.as_bytes();
    if bytes.len() > 64 {
        return true;
    }
    if bytes.iter().all(u8::is_ascii_digit) {
        return true;
    }
    if is_uuid(bytes) {
        return true;
    }
    if bytes.len() >= 16 && bytes.iter().all(u8::is_ascii_hexdigit) {
        return true;
    }
    bytes.len() >= 20
        && bytes.iter().any(u8::is_ascii_digit)
        && bytes.iter().any(u8::is_ascii_alphabetic)
}

fn is_uuid(b: &[u8]) -> bool {
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(method: &str, path: &str) -> String {
        endpoint_label(method, path, &[])
    }

    #[test]
    fn identifiers_become_placeholders() {
        assert_eq!(label("GET", "/users/42"), "GET /users/{id}");
        assert_eq!(
            label("GET", "/orders/0b7c2a9e-93f4-4f7a-9d6e-1c2b3a4d5e6f/items"),
            "GET /orders/{id}/items"
        );
        assert_eq!(
            label("DELETE", "/blobs/a3f9c0d1e2b3a4f5c6d7"),
            "DELETE /blobs/{id}"
        );
        assert_eq!(
            label("GET", "/sessions/sk_live_9aKd83JdkE02mcmq1"),
            "GET /sessions/{id}"
        );
        assert_eq!(
            label("POST", "/v1/chat/completions"),
            "POST /v1/chat/completions"
        );
        assert_eq!(label("GET", "/v2/models"), "GET /v2/models");
        assert_eq!(label("GET", ""), "GET /");
        assert_eq!(label("GET", "/"), "GET /");
        assert_eq!(label("GET", "/a/b?x=1"), "GET /a/b");
    }

    #[test]
    fn deep_paths_are_cut() {
        assert_eq!(label("GET", "/a/b/c/d/e/f/g/h"), "GET /a/b/c/d/e/f/…");
        assert_eq!(label("GET", "/a/b/c/d/e/f"), "GET /a/b/c/d/e/f");
    }

    #[test]
    fn registered_templates_win() {
        let templates = [
            PathTemplate::parse("/repos/{owner}/{repo}/issues").unwrap(),
            PathTemplate::parse("/files/*").unwrap(),
        ];
        assert_eq!(
            endpoint_label("GET", "/repos/rust-lang/rust/issues", &templates),
            "GET /repos/{owner}/{repo}/issues"
        );
        assert_eq!(
            endpoint_label("PUT", "/files/a/b/c.txt", &templates),
            "PUT /files/*"
        );
        assert_eq!(
            endpoint_label("GET", "/repos/rust-lang/rust", &templates),
            "GET /repos/rust-lang/rust"
        );
    }

    #[test]
    fn bad_templates_are_refused_with_a_reason() {
        for (bad, reason) in [
            ("users/{id}", "start with '/'"),
            ("/users?id=1", "query"),
            ("/a/*/b", "last segment"),
            ("/users/id{x}", "whole segment"),
        ] {
            let e = PathTemplate::parse(bad).unwrap_err();
            assert!(e.to_string().contains(reason), "{bad}: {e}");
            assert_eq!(e.template(), bad);
        }
    }
}
