//! Which addresses a guest's HTTP request may connect to. A name on the allowlist can resolve anywhere (a DNS
//! record pointing at 127.0.0.1, or at the cloud metadata service at 169.254.169.254), so the check that
//! matters is on the address actually dialled: internal ranges are refused unless a grant names that address
//! itself (`http:domain:10.0.0.5`).

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use factum_proto::permissions::http_ip_granted;
use factum_proto::{ErrorResponse, Permission};

/// The internal range `ip` is in, or `None` for a public address.
pub fn internal_range(ip: IpAddr) -> Option<&'static str> {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4_range(v4),
        IpAddr::V6(v6) => v6_range(v6),
    }
}

fn v4_range(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    Some(match () {
        _ if ip.is_unspecified() || a == 0 => "unspecified (0.0.0.0/8)",
        _ if ip.is_loopback() => "loopback (127.0.0.0/8)",
        _ if ip.is_private() => "private (RFC 1918)",
        _ if ip.is_link_local() => "link-local (169.254.0.0/16, cloud metadata)",
        _ if a == 100 && (64..128).contains(&b) => "shared address space (100.64.0.0/10)",
        _ if a == 192 && b == 0 && ip.octets()[2] == 0 => "IETF protocol assignments (192.0.0.0/24)",
        _ if a == 198 && (b == 18 || b == 19) => "benchmarking (198.18.0.0/15)",
        _ if ip.is_multicast() || ip.is_broadcast() || a >= 240 => "multicast, broadcast or reserved",
        _ => return None,
    })
}

fn v6_range(ip: Ipv6Addr) -> Option<&'static str> {
    let first = ip.segments()[0];
    Some(match () {
        _ if ip.is_unspecified() => "unspecified (::)",
        _ if ip.is_loopback() => "loopback (::1)",
        _ if first & 0xfe00 == 0xfc00 => "unique local (fc00::/7)",
        _ if first & 0xffc0 == 0xfe80 => "link-local (fe80::/10)",
        _ if ip.is_multicast() => "multicast (ff00::/8)",
        // NAT64 and 6to4 embed an IPv4 address a router would reach on the guest's behalf.
        _ if first == 0x0064 && ip.segments()[1] == 0xff9b => "NAT64 (64:ff9b::/96)",
        _ if first == 0x2002 => "6to4 (2002::/16)",
        _ => return None,
    })
}

/// Checks one address a request to `host` would connect to.
pub fn check_address(granted: &[Permission], host: &str, ip: IpAddr) -> Result<(), ErrorResponse> {
    match internal_range(ip) {
        Some(range) if !http_ip_granted(granted, ip) => Err(ErrorResponse::permission_denied(format!(
            "{host} is at {ip}, a {range} address; only a grant naming it (http:domain:{}) reaches it",
            ip.to_canonical()
        ))
        .with_detail("permission", format!("http:domain:{}", ip.to_canonical()))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn internal_ranges_are_named_and_public_ones_are_not() {
        for internal in [
            "127.0.0.1",
            "127.255.0.9",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "::ffff:127.0.0.1",
            "fd00::1",
            "fe80::1",
            "64:ff9b::a00:1",
            "2002:7f00:1::",
        ] {
            assert!(internal_range(ip(internal)).is_some(), "{internal} should be internal");
        }
        for public in ["1.1.1.1", "93.184.216.34", "172.32.0.1", "100.128.0.1", "2606:4700::1111"] {
            assert_eq!(internal_range(ip(public)), None, "{public} should be public");
        }
    }

    #[test]
    fn an_internal_address_needs_a_grant_naming_it() {
        let name_only: Vec<Permission> =
            vec!["http:request".parse().unwrap(), "http:domain:localhost".parse().unwrap()];
        let err = check_address(&name_only, "localhost", ip("127.0.0.1")).unwrap_err();
        assert_eq!(err.error_code, factum_proto::ErrorCode::PermissionDenied);
        assert!(err.message.contains("loopback"), "{}", err.message);
        let mut with_ip = name_only.clone();
        with_ip.push("http:domain:127.0.0.1".parse().unwrap());
        assert!(check_address(&with_ip, "localhost", ip("127.0.0.1")).is_ok());
        assert!(check_address(&with_ip, "localhost", ip("::ffff:127.0.0.1")).is_ok());
        assert!(check_address(&with_ip, "localhost", ip("127.0.0.2")).is_err());
        assert!(check_address(&name_only, "example.com", ip("93.184.216.34")).is_ok());
    }
}
