//! PROXY protocol v2, from trusted load balancers only: the client's real
//! address for admission, per-address limits, blocks and the audit log.
//!
//! A connection from an address in the trusted list must start with a v2
//! header (the binary form; v1 text is not accepted); the header's source
//! address then stands for the peer. `LOCAL` (the balancer's own health
//! checks) keeps the balancer's address. A connection from any other
//! address is never parsed for a header: a client cannot claim another
//! address by sending one.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// The 12-byte signature of a v2 header.
const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest header accepted (addresses plus TLVs).
const MAX_HEADER: usize = 16 + 512;

/// An address or network (`10.0.0.2`, `10.1.0.0/16`, `fd00::/8`) whose
/// connections carry a PROXY v2 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrustedProxy {
    net: IpAddr,
    prefix: u8,
}

/// A trusted-proxy entry that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid proxy address {0:?}: expected an IP address or a network (10.0.0.0/24, fd00::/8)")]
pub struct InvalidTrustedProxy(pub String);

impl FromStr for TrustedProxy {
    type Err = InvalidTrustedProxy;

    fn from_str(s: &str) -> Result<TrustedProxy, InvalidTrustedProxy> {
        let bad = || InvalidTrustedProxy(s.chars().take(64).collect());
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p.parse::<u8>().map_err(|_| bad())?)),
            None => (s, None),
        };
        let net: IpAddr = ip.parse().map_err(|_| bad())?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(bad());
        }
        Ok(TrustedProxy {
            net: mask(net, prefix),
            prefix,
        })
    }
}

fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let m = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix))
            };
            IpAddr::V4(Ipv4Addr::from(bits & m))
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let m = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix))
            };
            IpAddr::V6(Ipv6Addr::from(bits & m))
        }
    }
}

impl TrustedProxy {
    /// Whether `ip` is this address or in this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        ip.is_ipv4() == self.net.is_ipv4() && mask(ip, self.prefix) == self.net
    }
}

/// Why a trusted peer's header was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HeaderError {
    /// Not a v2 header: wrong signature, version or command.
    NotV2,
    /// A length over [`MAX_HEADER`], or an address block too short for
    /// its family.
    Malformed,
    /// The connection ended or timed out first.
    Incomplete,
}

/// What a complete header says: the client's address, or `None` for
/// `LOCAL` and for families other than TCP over IPv4 / IPv6.
pub(crate) fn parse(header: &[u8]) -> Result<(usize, Option<SocketAddr>), HeaderError> {
    if header.len() < 16 {
        return Err(HeaderError::Incomplete);
    }
    if header[..12] != SIGNATURE {
        return Err(HeaderError::NotV2);
    }
    let (version, command) = (header[12] >> 4, header[12] & 0x0f);
    if version != 2 || command > 1 {
        return Err(HeaderError::NotV2);
    }
    let len = usize::from(u16::from_be_bytes([header[14], header[15]]));
    if 16 + len > MAX_HEADER {
        return Err(HeaderError::Malformed);
    }
    if header.len() < 16 + len {
        return Err(HeaderError::Incomplete);
    }
    let body = &header[16..16 + len];
    if command == 0 {
        return Ok((16 + len, None)); // LOCAL
    }
    let source = match header[13] {
        // TCP over IPv4: src, dst (4 each), src port, dst port.
        0x11 => {
            let a: [u8; 12] = body
                .get(..12)
                .and_then(|b| b.try_into().ok())
                .ok_or(HeaderError::Malformed)?;
            let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            Some(SocketAddr::new(
                IpAddr::V4(ip),
                u16::from_be_bytes([a[8], a[9]]),
            ))
        }
        // TCP over IPv6: src, dst (16 each), src port, dst port.
        0x21 => {
            let a: [u8; 36] = body
                .get(..36)
                .and_then(|b| b.try_into().ok())
                .ok_or(HeaderError::Malformed)?;
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&a[..16]);
            Some(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(ip)),
                u16::from_be_bytes([a[32], a[33]]),
            ))
        }
        // UDP, UNIX, UNSPEC: keep the balancer's address.
        _ => None,
    };
    Ok((16 + len, source))
}

/// Reads one v2 header from a trusted peer within `timeout`, consuming
/// exactly its bytes. `Ok(None)`: keep the peer's own address.
pub(crate) async fn read_header<R: AsyncRead + Unpin>(
    rd: &mut R,
    timeout: Duration,
) -> Result<Option<SocketAddr>, HeaderError> {
    let read = async {
        let mut buf = vec![0u8; 16];
        rd.read_exact(&mut buf)
            .await
            .map_err(|_| HeaderError::Incomplete)?;
        if buf[..12] != SIGNATURE {
            return Err(HeaderError::NotV2);
        }
        let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        if 16 + len > MAX_HEADER {
            return Err(HeaderError::Malformed);
        }
        buf.resize(16 + len, 0);
        rd.read_exact(&mut buf[16..])
            .await
            .map_err(|_| HeaderError::Incomplete)?;
        parse(&buf).map(|(_, source)| source)
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or(Err(HeaderError::Incomplete))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn header_v4(src: [u8; 4], port: u16) -> Vec<u8> {
        let mut h = SIGNATURE.to_vec();
        h.extend([0x21, 0x11, 0, 12]);
        h.extend(src);
        h.extend([10, 0, 0, 1]);
        h.extend(port.to_be_bytes());
        h.extend(6767u16.to_be_bytes());
        h
    }

    #[test]
    fn a_tcp4_header_gives_the_source_and_local_keeps_the_peer() {
        let h = header_v4([203, 0, 113, 7], 5555);
        assert_eq!(
            parse(&h),
            Ok((28, Some("203.0.113.7:5555".parse().unwrap())))
        );
        let mut local = SIGNATURE.to_vec();
        local.extend([0x20, 0x00, 0, 0]);
        assert_eq!(parse(&local), Ok((16, None)));
        let mut v1 = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n".to_vec();
        v1.resize(32, 0);
        assert_eq!(parse(&v1), Err(HeaderError::NotV2));
        let mut short = SIGNATURE.to_vec();
        short.extend([0x21, 0x21, 0, 12]);
        short.extend([0; 12]);
        assert_eq!(
            parse(&short),
            Err(HeaderError::Malformed),
            "12 bytes cannot hold TCP6"
        );
    }

    #[test]
    fn trusted_networks_match_their_addresses_only() {
        let net: TrustedProxy = "10.1.0.0/16".parse().unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(
            net.contains("::ffff:10.1.0.9".parse().unwrap()),
            "v4-mapped"
        );
        let one: TrustedProxy = "fd00::1".parse().unwrap();
        assert!(one.contains("fd00::1".parse().unwrap()));
        assert!(!one.contains("fd00::2".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<TrustedProxy>().is_err());
        assert!("balancer".parse::<TrustedProxy>().is_err());
    }

    proptest! {
        /// Any bytes: parsed or refused, never a panic, never past the
        /// declared length.
        #[test]
        fn any_bytes_are_parsed_or_refused(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok((used, _)) = parse(&bytes) {
                prop_assert!(used <= bytes.len() && used <= MAX_HEADER);
            }
        }

        /// Any TCP4 header round-trips its source.
        #[test]
        fn tcp4_sources_round_trip(src in any::<[u8; 4]>(), port in any::<u16>(), tlv in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut h = header_v4(src, port);
            let len = 12 + tlv.len() as u16;
            h[14..16].copy_from_slice(&len.to_be_bytes());
            h.extend(&tlv);
            let want = SocketAddr::new(IpAddr::V4(Ipv4Addr::from(src)), port);
            prop_assert_eq!(parse(&h), Ok((h.len(), Some(want))));
        }
    }
}
