//! Keying peers by address.

use std::net::{IpAddr, Ipv6Addr};

/// The limiter key of a peer address: IPv4 as is, an IPv4-mapped IPv6
/// address as its IPv4 address, other IPv6 addresses truncated to
/// `v6_prefix_len` bits (64 by default: one host's address spray is one key).
///
/// ```
/// use netproc_limits::ip_key;
///
/// let a = ip_key("2001:db8:1:2:aaaa::1".parse().unwrap(), 64);
/// let b = ip_key("2001:db8:1:2:bbbb::9".parse().unwrap(), 64);
/// assert_eq!(a, b);
/// assert_eq!(ip_key("::ffff:10.0.0.1".parse().unwrap(), 64), "10.0.0.1".parse::<std::net::IpAddr>().unwrap());
/// ```
pub fn ip_key(ip: IpAddr, v6_prefix_len: u8) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let bits = u128::from(v6);
            let prefix = u32::from(v6_prefix_len.min(128));
            let mask = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - prefix)
            };
            IpAddr::V6(Ipv6Addr::from(bits & mask))
        }
    }
}
