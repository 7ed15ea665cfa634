//! Header rules of the gateway: hop-by-hop fields (RFC 9110 §7.6.1) are
//! never forwarded either way, `X-Forwarded-*` are added, and each route's
//! own additions and removals are applied.

use std::net::SocketAddr;

use http::{header, HeaderMap, HeaderName, HeaderValue};

use super::settings::HeaderRules;

/// The hop-by-hop fields, beside those a `Connection` header lists.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRAILER,
    HeaderName::from_static("proxy-connection"),
];

/// Removes the hop-by-hop fields, those named in `Connection` first.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Applies a route's rules: removals first, then additions.
pub fn apply_rules(headers: &mut HeaderMap, rules: &CompiledRules) {
    for name in &rules.remove {
        headers.remove(name);
    }
    for (name, value) in &rules.add {
        headers.insert(name.clone(), value.clone());
    }
}

/// [`HeaderRules`] parsed once.
#[derive(Debug, Clone, Default)]
pub struct CompiledRules {
    remove: Vec<HeaderName>,
    add: Vec<(HeaderName, HeaderValue)>,
}

impl CompiledRules {
    /// The rules, whose names and values the settings' check accepted.
    pub fn new(rules: &HeaderRules) -> Self {
        CompiledRules {
            remove: rules
                .remove
                .iter()
                .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
                .collect(),
            add: rules
                .add
                .iter()
                .filter_map(|(n, v)| {
                    Some((
                        HeaderName::from_bytes(n.as_bytes()).ok()?,
                        HeaderValue::from_str(v).ok()?,
                    ))
                })
                .collect(),
        }
    }
}

/// Sets the forwarding fields the upstream reads: `X-Forwarded-For` is the
/// chain the client brought (every field of it, in order) with the client's
/// address appended; `X-Forwarded-Proto` (`http`) and `X-Forwarded-Host`
/// (the client's `Host`) are the gateway's, whatever the client sent in
/// their place (every field of theirs replaced, or removed when there is no
/// `Host`); `Forwarded` is removed (a client could claim any address or
/// host in it).
pub fn add_forwarded(headers: &mut HeaderMap, client: Option<SocketAddr>, host: Option<&str>) {
    static FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
    static PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
    static HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
    let mut chain: Vec<String> = headers
        .get_all(&FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
        .collect();
    if let Some(client) = client {
        chain.push(client.ip().to_string());
    }
    headers.remove(&FOR);
    if !chain.is_empty() {
        if let Ok(value) = HeaderValue::from_str(&chain.join(", ")) {
            headers.insert(FOR.clone(), value);
        }
    }
    headers.remove(header::FORWARDED);
    headers.insert(PROTO.clone(), HeaderValue::from_static("http"));
    match host.and_then(|h| HeaderValue::from_str(h).ok()) {
        Some(value) => {
            headers.insert(HOST.clone(), value);
        }
        None => {
            headers.remove(&HOST);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_fields_and_those_connection_lists_are_removed() {
        let mut h = HeaderMap::new();
        for (n, v) in [
            ("connection", "keep-alive, x-secret-hop"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic x"),
            ("proxy-authenticate", "Basic"),
            ("te", "trailers"),
            ("trailer", "x-t"),
            ("x-secret-hop", "1"),
            ("x-kept", "1"),
            ("authorization", "Bearer k"),
        ] {
            h.append(HeaderName::from_static(n), HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["x-kept", "authorization"]);
    }

    #[test]
    fn forwarded_for_appends_the_client_to_the_list_it_brought() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        add_forwarded(
            &mut h,
            Some("127.0.0.2:5000".parse().unwrap()),
            Some("api.local"),
        );
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.2");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "api.local");
    }

    #[test]
    fn the_clients_forwarding_claims_are_replaced_or_removed() {
        let mut h = HeaderMap::new();
        for (n, v) in [
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-for", " 10.0.0.2, 10.0.0.3 "),
            ("x-forwarded-for", ""),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil.example"),
            ("x-forwarded-host", "evil2.example"),
            ("forwarded", "for=1.2.3.4;host=evil.example"),
        ] {
            h.append(HeaderName::from_static(n), HeaderValue::from_static(v));
        }
        add_forwarded(&mut h, Some("127.0.0.2:5000".parse().unwrap()), None);
        let all = |name: &str| -> Vec<&str> {
            h.get_all(name)
                .iter()
                .map(|v| v.to_str().unwrap())
                .collect()
        };
        assert_eq!(
            all("x-forwarded-for"),
            ["10.0.0.1, 10.0.0.2, 10.0.0.3, 127.0.0.2"]
        );
        assert_eq!(all("x-forwarded-proto"), ["http"]);
        assert!(all("x-forwarded-host").is_empty());
        assert!(all("forwarded").is_empty());
    }
}
