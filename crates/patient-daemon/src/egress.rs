//! The egress guard: requests (and webhook deliveries) never reach
//! loopback, private (RFC 1918), CGNAT, link-local (cloud metadata
//! included), unique-local, multicast, broadcast or unspecified addresses,
//! in any spelling, unless `egress.allow` covers them.
//!
//! The guard runs in the transport, on every connect (so on every redirect
//! hop), after DNS resolution, on the very addresses connected to
//! ([`patient_http::client::AddressFilter`]). A URL whose host is a literal
//! refused address is refused earlier, at submit ([`literal_denied`]). IPv4
//! addresses written in decimal or hexadecimal (`http://2130706433/`,
//! `http://0x7f.1/`) are normalised by the URL parser before either check;
//! IPv4-mapped, IPv4-compatible, NAT64 and 6to4 IPv6 addresses are checked
//! as the IPv4 address they carry.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use patient_http::client::AddressFilter;

/// A CIDR block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cidr {
    addr: IpAddr,
    bits: u8,
}

impl Cidr {
    fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.bits)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.bits))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// What `egress.allow` exempts: CIDRs and host names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allow {
    cidrs: Vec<Cidr>,
    hosts: Vec<String>,
}

impl Allow {
    /// The exemptions of `egress.allow` (entries checked by the settings).
    pub fn new(entries: &[String]) -> Allow {
        let mut allow = Allow::default();
        for entry in entries {
            if let Some((addr, bits)) = entry.split_once('/') {
                if let (Ok(addr), Ok(bits)) = (addr.parse::<IpAddr>(), bits.parse::<u8>()) {
                    allow.cidrs.push(Cidr { addr, bits });
                }
            } else if let Ok(addr) = entry.parse::<IpAddr>() {
                let bits = if addr.is_ipv4() { 32 } else { 128 };
                allow.cidrs.push(Cidr { addr, bits });
            } else {
                allow
                    .hosts
                    .push(entry.trim_end_matches('.').to_ascii_lowercase());
            }
        }
        allow
    }

    fn covers(&self, host: &str, ip: IpAddr) -> bool {
        let host = host.trim_end_matches('.');
        self.hosts.iter().any(|h| h.eq_ignore_ascii_case(host))
            || self.cidrs.iter().any(|c| c.contains(ip))
    }

    /// Why `ip` (an address of `host`) is refused, or `None` when it may be
    /// connected to.
    pub fn denied(&self, host: &str, ip: IpAddr) -> Option<&'static str> {
        let reason = classify(ip)?;
        (!self.covers(host, ip)).then_some(reason)
    }

    /// The transport's filter for these exemptions.
    pub fn filter(self) -> AddressFilter {
        AddressFilter::new(move |host, ip| {
            match self.denied(host, ip) {
            None => Ok(()),
            Some(reason) => Err(format!(
                "{reason} address, refused by the egress guard (add it to egress.allow to permit it)"
            )),
        }
        })
    }
}

/// What kind of refused address `ip` is, if it is one.
pub fn classify(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    Some(match o {
        [127, ..] => "a loopback",
        [10, ..] | [172, 16..=31, ..] | [192, 168, ..] => "a private",
        [100, 64..=127, ..] => "a carrier-grade NAT",
        [169, 254, ..] => "a link-local (cloud metadata)",
        [0, ..] => "an unspecified",
        [224..=239, ..] => "a multicast",
        [255, 255, 255, 255] => "a broadcast",
        [240..=255, ..] => "a reserved",
        [192, 0, 0, _] => "an IETF protocol",
        [198, 18..=19, ..] => "a benchmarking",
        _ => return None,
    })
}

fn classify_v6(ip: Ipv6Addr) -> Option<&'static str> {
    if ip.is_loopback() {
        return Some("a loopback");
    }
    if ip.is_unspecified() {
        return Some("an unspecified");
    }
    let s = ip.segments();
    // IPv4 carried inside IPv6: mapped (::ffff:a.b.c.d), compatible
    // (::a.b.c.d), NAT64 (64:ff9b::a.b.c.d) and 6to4 (2002:AABB:CCDD::).
    let embedded = match s {
        [0, 0, 0, 0, 0, 0xffff, hi, lo]
        | [0, 0, 0, 0, 0, 0, hi, lo]
        | [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => {
            Some(Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo)))
        }
        [0x2002, hi, lo, ..] => Some(Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo))),
        _ => None,
    };
    if let Some(v4) = embedded {
        return classify_v4(v4).or(Some("an IPv4-embedding"));
    }
    Some(match s[0] {
        0xfc00..=0xfdff => "a unique-local",
        0xfe80..=0xfebf => "a link-local",
        0xfec0..=0xfeff => "a site-local",
        0xff00..=0xffff => "a multicast",
        _ => return None,
    })
}

/// When `url`'s host is an IP literal the guard refuses: the address and
/// why (for a `422 egress_denied` at submit).
pub fn literal_denied(allow: &Allow, url: &url::Url) -> Option<(IpAddr, &'static str)> {
    let ip = match url.host()? {
        url::Host::Ipv4(v4) => IpAddr::V4(v4),
        url::Host::Ipv6(v6) => IpAddr::V6(v6),
        url::Host::Domain(_) => return None,
    };
    allow.denied(&ip.to_string(), ip).map(|reason| (ip, reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denied(url: &str) -> Option<&'static str> {
        literal_denied(&Allow::default(), &url::Url::parse(url).unwrap()).map(|(_, r)| r)
    }

    #[test]
    fn every_spelling_of_a_refused_address_is_refused() {
        for url in [
            "http://127.0.0.1/",
            "http://2130706433/",
            "http://0x7f000001/",
            "http://0x7f.0.0.1/",
            "http://017700000001/",
            "http://127.1/",
            "http://[::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:7f00:1]/",
            "http://[::127.0.0.1]/",
            "http://[64:ff9b::a9fe:a9fe]/",
            "http://[2002:c0a8:0101::]/",
            "http://169.254.169.254/latest/meta-data/",
            "http://10.0.0.1/",
            "http://172.16.0.1/",
            "http://172.31.255.255/",
            "http://192.168.1.1/",
            "http://100.64.0.1/",
            "http://0.0.0.0/",
            "http://[::]/",
            "http://224.0.0.1/",
            "http://255.255.255.255/",
            "http://[fd00::1]/",
            "http://[fe80::1]/",
            "http://[ff02::1]/",
        ] {
            assert!(denied(url).is_some(), "{url} should be refused");
        }
    }

    #[test]
    fn public_addresses_and_names_pass() {
        for url in [
            "http://93.184.216.34/",
            "http://172.32.0.1/",
            "http://100.128.0.1/",
            "http://[2606:4700::1111]/",
            "http://api.example.com/",
        ] {
            assert_eq!(denied(url), None, "{url}");
        }
    }

    #[test]
    fn the_allowlist_exempts_cidrs_and_host_names() {
        let allow = Allow::new(&[
            "10.1.0.0/16".into(),
            "::1".into(),
            "internal.example".into(),
        ]);
        assert_eq!(allow.denied("x", "10.1.2.3".parse().unwrap()), None);
        assert!(allow.denied("x", "10.2.0.1".parse().unwrap()).is_some());
        assert_eq!(allow.denied("x", "::1".parse().unwrap()), None);
        assert_eq!(
            allow.denied("Internal.Example.", "192.168.0.9".parse().unwrap()),
            None
        );
        let filter = allow.filter();
        let refusal = filter
            .check("db", "192.168.0.9".parse().unwrap())
            .unwrap_err();
        assert!(refusal.contains("private address"), "{refusal}");
    }
}
