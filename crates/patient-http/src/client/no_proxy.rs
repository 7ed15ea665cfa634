//! [`NoProxy`]: the hosts that bypass a proxy, in `NO_PROXY` syntax.

use std::net::IpAddr;

/// A parsed `NO_PROXY` list: comma-separated entries, each one of
///
/// * `*`: every host;
/// * an IP address (`10.0.0.1`, `::1`, `[::1]`), matching that address;
/// * a CIDR block (`10.0.0.0/8`, `::1/128`), matching the addresses in it;
/// * a domain (`example.com`, `.example.com`, `*.example.com`), matching
///   that host and its subdomains (with or without the leading dot, as curl
///   does).
///
/// A `:port` after a host or address is ignored (every port matches).
/// Matching is case-insensitive; IP entries only match IP hosts and domain
/// entries only host names. Entries that are none of these (`10.0.0.0/33`)
/// are ignored.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct NoProxy {
    all: bool,
    blocks: Vec<IpBlock>,
    domains: Vec<String>,
}

/// An address and how many leading bits of it must match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct IpBlock {
    addr: IpAddr,
    prefix: u8,
}

impl IpBlock {
    fn parse(entry: &str) -> Option<IpBlock> {
        match entry.split_once('/') {
            Some((addr, prefix)) => {
                let addr = parse_ip(addr)?;
                let prefix: u8 = prefix.parse().ok()?;
                (prefix <= max_prefix(addr)).then_some(IpBlock { addr, prefix })
            }
            None => {
                let addr = parse_ip(entry)?;
                Some(IpBlock {
                    addr,
                    prefix: max_prefix(addr),
                })
            }
        }
    }

    fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

fn max_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        32
    } else {
        128
    }
}

/// An IP address, IPv6 with or without brackets.
fn parse_ip(text: &str) -> Option<IpAddr> {
    let text = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(text);
    text.parse().ok()
}

/// `entry` without a trailing `:port` (IPv6 literals kept whole).
fn without_port(entry: &str) -> &str {
    if let Some(rest) = entry.strip_prefix('[') {
        // `[v6]` or `[v6]:port`
        return match rest.split_once(']') {
            Some((inside, _)) => &entry[..inside.len() + 2],
            None => entry,
        };
    }
    match entry.rsplit_once(':') {
        Some((host, port))
            if !host.contains(':')
                && !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit()) =>
        {
            host
        }
        _ => entry,
    }
}

impl NoProxy {
    /// Parses a comma-separated list (see the type's documentation).
    pub(crate) fn parse(list: &str) -> NoProxy {
        let mut no_proxy = NoProxy::default();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            if entry == "*" {
                no_proxy.all = true;
                continue;
            }
            let entry = entry.to_ascii_lowercase();
            let entry = if entry.contains('/') {
                entry.as_str()
            } else {
                without_port(&entry)
            };
            if let Some(block) = IpBlock::parse(entry) {
                no_proxy.blocks.push(block);
                continue;
            }
            let domain = entry
                .trim_start_matches("*.")
                .trim_start_matches('.')
                .trim_end_matches('.');
            let is_name = !domain.is_empty()
                && domain
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
            if is_name {
                no_proxy.domains.push(domain.to_owned());
            } else {
                tracing::warn!(entry, "ignoring an invalid NO_PROXY entry");
            }
        }
        no_proxy
    }

    /// Whether requests to `host` (a name, or an IP address without
    /// brackets) bypass the proxy.
    pub(crate) fn matches(&self, host: &str) -> bool {
        if self.all {
            return true;
        }
        if let Some(ip) = parse_ip(host) {
            return self.blocks.iter().any(|block| block.contains(ip));
        }
        let host = host.trim_end_matches('.');
        self.domains.iter().any(|domain| {
            host.eq_ignore_ascii_case(domain)
                || (host.len() > domain.len()
                    && host.as_bytes()[host.len() - domain.len() - 1] == b'.'
                    && host[host.len() - domain.len()..].eq_ignore_ascii_case(domain))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_with_and_without_a_leading_dot() {
        let list = NoProxy::parse("localhost, .internal.example, *.corp.test, Foo.COM:8080");
        assert!(list.matches("localhost"));
        assert!(list.matches("a.internal.example"));
        assert!(list.matches("internal.example"));
        assert!(!list.matches("xinternal.example"));
        assert!(list.matches("deep.a.corp.test"));
        assert!(list.matches("foo.com"));
        assert!(list.matches("WWW.foo.com"));
        assert!(list.matches("foo.com."));
        assert!(!list.matches("example.com"));
        assert!(!list.matches("com"));
    }

    #[test]
    fn ip_addresses_and_cidr_blocks() {
        let list = NoProxy::parse(
            "10.0.0.0/8, 192.168.1.7, ::1/128, [fd00::]/8, [2001:db8::5]:443, 172.16.0.1:3128",
        );
        assert!(list.matches("10.0.0.1"));
        assert!(list.matches("10.255.255.255"));
        assert!(!list.matches("11.0.0.1"));
        assert!(list.matches("192.168.1.7"));
        assert!(!list.matches("192.168.1.8"));
        assert!(list.matches("::1"));
        assert!(list.matches("[::1]"));
        assert!(!list.matches("::2"));
        assert!(list.matches("fd12:3456::1"));
        assert!(!list.matches("fe80::1"));
        assert!(list.matches("2001:db8::5"));
        assert!(list.matches("172.16.0.1"));
        // IP entries never match names, nor the other family.
        assert!(!list.matches("10.example"));
        assert!(!NoProxy::parse("0.0.0.0/0").matches("::1"));
        assert!(NoProxy::parse("0.0.0.0/0").matches("8.8.8.8"));
        assert!(NoProxy::parse("::/0").matches("2001:db8::1"));
    }

    #[test]
    fn star_matches_everything_and_invalid_entries_are_ignored() {
        assert!(NoProxy::parse("*").matches("anything.example"));
        assert!(NoProxy::parse("a.test, *").matches("10.1.2.3"));
        let list = NoProxy::parse("10.0.0.0/33, ::1/129, 10.0.0.0/x, bad host, ,");
        assert_eq!(list, NoProxy::default());
        assert!(!list.matches("10.0.0.1"));
        assert!(!NoProxy::parse("").matches("localhost"));
    }
}
