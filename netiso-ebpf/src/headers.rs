//! Packet header parsing shared by the tracepoint (which reads kernel memory) and the tc programs
//! (which read the packet). Both go through `HeaderSource`, so the parser is written once.

use netiso_common::{FlowTuple, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;

const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DSTOPTS: u8 = 60;
/// Extension headers walked before giving up on finding the transport header.
const MAX_IPV6_EXTENSIONS: usize = 4;

/// Reads `N` bytes at an offset from some base (a kernel address or the start of a packet).
pub trait HeaderSource {
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]>;

    /// As `read`, straight into `out`: kernels before 6.x allow programs 512 bytes of stack,
    /// which temporary copies of headers use up.
    fn read_into<const N: usize>(&self, offset: usize, out: &mut [u8; N]) -> Option<()>;
}

pub struct Parsed {
    pub tuple: FlowTuple,
    pub tcp_flags: u8,
}

#[inline(always)]
fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Parses an IP packet whose network header is at `l3`. Returns `None` when the headers cannot be
/// read (truncated) and for non-IP protocols.
#[inline(always)]
pub fn parse_ip<S: HeaderSource>(src: &S, ethertype: u16, l3: usize) -> Option<Parsed> {
    let mut tuple = FlowTuple::default();
    let (l4, protocol, first_fragment) = match ethertype {
        ETH_P_IP => {
            let ip: [u8; 12] = src.read(l3)?;
            if ip[0] >> 4 != 4 {
                return None;
            }
            tuple.family = 4;
            tuple.src_addr[10] = 0xff;
            tuple.src_addr[11] = 0xff;
            tuple.dst_addr[10] = 0xff;
            tuple.dst_addr[11] = 0xff;
            let mut addr = [0u8; 4];
            src.read_into(l3 + 12, &mut addr)?;
            tuple.src_addr[12..16].copy_from_slice(&addr);
            src.read_into(l3 + 16, &mut addr)?;
            tuple.dst_addr[12..16].copy_from_slice(&addr);
            let ihl = ((ip[0] & 0x0f) as usize) * 4;
            let fragment_offset = be16(&ip, 6) & 0x1fff;
            (l3 + ihl, ip[9], fragment_offset == 0)
        }
        ETH_P_IPV6 => {
            let ip: [u8; 8] = src.read(l3)?;
            if ip[0] >> 4 != 6 {
                return None;
            }
            tuple.family = 6;
            src.read_into(l3 + 8, &mut tuple.src_addr)?;
            src.read_into(l3 + 24, &mut tuple.dst_addr)?;
            let mut next = ip[6];
            let mut offset = l3 + 40;
            let mut first_fragment = true;
            for _ in 0..MAX_IPV6_EXTENSIONS {
                match next {
                    IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS => {
                        let ext: [u8; 2] = src.read(offset)?;
                        next = ext[0];
                        offset += (ext[1] as usize + 1) * 8;
                    }
                    IPV6_FRAGMENT => {
                        let ext: [u8; 4] = src.read(offset)?;
                        next = ext[0];
                        first_fragment = be16(&ext, 2) >> 3 == 0;
                        offset += 8;
                    }
                    _ => break,
                }
            }
            (offset, next, first_fragment)
        }
        _ => return None,
    };
    tuple.protocol = protocol;
    let mut tcp_flags = 0;
    // Later fragments carry no transport header: keep the addresses and protocol only.
    if first_fragment {
        match protocol {
            IPPROTO_TCP => {
                let tcp: [u8; 14] = src.read(l4)?;
                tuple.src_port = be16(&tcp, 0);
                tuple.dst_port = be16(&tcp, 2);
                tcp_flags = tcp[13];
            }
            IPPROTO_UDP | IPPROTO_SCTP => {
                let ports: [u8; 4] = src.read(l4)?;
                tuple.src_port = be16(&ports, 0);
                tuple.dst_port = be16(&ports, 2);
            }
            IPPROTO_ICMP | IPPROTO_ICMPV6 => {
                let icmp: [u8; 2] = src.read(l4)?;
                tuple.icmp_type = icmp[0];
                tuple.icmp_code = icmp[1];
            }
            _ => {}
        }
    }
    Some(Parsed { tuple, tcp_flags })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A packet in a byte slice, as the tc programs see one.
    struct Bytes<'a>(&'a [u8]);

    impl HeaderSource for Bytes<'_> {
        fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
            self.0.get(offset..offset.checked_add(N)?)?.try_into().ok()
        }

        fn read_into<const N: usize>(&self, offset: usize, out: &mut [u8; N]) -> Option<()> {
            *out = self.read(offset)?;
            Some(())
        }
    }

    /// An IPv4 header of `ihl` 32-bit words from 10.0.0.1 to 10.0.0.2, then `l4`.
    fn ipv4(protocol: u8, ihl: u8, fragment_offset: u16, l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0x40 | ihl, 0, 0, 0, 0, 0];
        p.extend_from_slice(&fragment_offset.to_be_bytes());
        p.extend_from_slice(&[64, protocol, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
        p.resize(usize::from(ihl) * 4, 0);
        p.extend_from_slice(l4);
        p
    }

    /// An IPv6 header from fd00::1 to fd00::2 whose next header is `next`, then `rest`.
    fn ipv6(next: u8, rest: &[u8]) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0, 0, 0, next, 64];
        for last in [1, 2] {
            let mut addr = [0u8; 16];
            addr[0] = 0xfd;
            addr[15] = last;
            p.extend_from_slice(&addr);
        }
        p.extend_from_slice(rest);
        p
    }

    /// A TCP header from port 40000 to 443 with the SYN flag.
    fn tcp_syn() -> Vec<u8> {
        let mut h = vec![0u8; 20];
        h[0..2].copy_from_slice(&40000u16.to_be_bytes());
        h[2..4].copy_from_slice(&443u16.to_be_bytes());
        h[13] = 0x02;
        h
    }

    fn parse(packet: &[u8], ethertype: u16) -> Option<Parsed> {
        parse_ip(&Bytes(packet), ethertype, 0)
    }

    #[test]
    fn an_ipv4_tcp_syn_gives_mapped_addresses_ports_and_flags() {
        let parsed = parse(&ipv4(IPPROTO_TCP, 5, 0, &tcp_syn()), ETH_P_IP).unwrap();
        let t = parsed.tuple;
        assert_eq!((t.family, t.protocol, t.src_port, t.dst_port), (4, IPPROTO_TCP, 40000, 443));
        assert_eq!(t.src_addr, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 1]);
        assert_eq!(t.dst_addr[12..], [10, 0, 0, 2]);
        assert_eq!(parsed.tcp_flags, 0x02);
    }

    #[test]
    fn ipv4_options_move_the_transport_header() {
        let udp = [0x1f, 0x90, 0x00, 0x35, 0, 8, 0, 0];
        let t = parse(&ipv4(IPPROTO_UDP, 6, 0, &udp), ETH_P_IP).unwrap().tuple;
        assert_eq!((t.src_port, t.dst_port), (8080, 53));
    }

    #[test]
    fn a_later_ipv4_fragment_keeps_addresses_and_protocol_but_has_no_ports() {
        let t = parse(&ipv4(IPPROTO_UDP, 5, 185, &[0x1f, 0x90, 0x00, 0x35]), ETH_P_IP).unwrap().tuple;
        assert_eq!((t.protocol, t.src_port, t.dst_port), (IPPROTO_UDP, 0, 0));
        assert_eq!(t.dst_addr[12..], [10, 0, 0, 2]);
    }

    #[test]
    fn icmp_gives_type_and_code() {
        let t = parse(&ipv4(IPPROTO_ICMP, 5, 0, &[3, 13, 0, 0]), ETH_P_IP).unwrap().tuple;
        assert_eq!((t.icmp_type, t.icmp_code, t.src_port), (3, 13, 0));
    }

    #[test]
    fn ipv6_extension_headers_are_walked_to_the_transport_header() {
        // Hop-by-hop options (8 bytes), then a first fragment (offset 0), then TCP.
        let mut rest = vec![IPV6_FRAGMENT, 0, 0, 0, 0, 0, 0, 0];
        rest.extend_from_slice(&[IPPROTO_TCP, 0, 0, 1, 0, 0, 0, 7]);
        rest.extend_from_slice(&tcp_syn());
        let parsed = parse(&ipv6(IPV6_HOPOPTS, &rest), ETH_P_IPV6).unwrap();
        let t = parsed.tuple;
        assert_eq!((t.family, t.protocol, t.src_port, t.dst_port), (6, IPPROTO_TCP, 40000, 443));
        assert_eq!((t.src_addr[0], t.src_addr[15], t.dst_addr[15]), (0xfd, 1, 2));
        assert_eq!(parsed.tcp_flags, 0x02);
    }

    #[test]
    fn a_later_ipv6_fragment_has_no_ports() {
        let mut rest = vec![IPPROTO_UDP, 0, 0x05, 0x48, 0, 0, 0, 7];
        rest.extend_from_slice(&[0x1f, 0x90, 0x00, 0x35]);
        let t = parse(&ipv6(IPV6_FRAGMENT, &rest), ETH_P_IPV6).unwrap().tuple;
        assert_eq!((t.protocol, t.src_port, t.dst_port), (IPPROTO_UDP, 0, 0));
    }

    #[test]
    fn too_many_ipv6_extension_headers_leave_the_transport_unread() {
        let mut rest = Vec::new();
        for _ in 0..=MAX_IPV6_EXTENSIONS {
            rest.extend_from_slice(&[IPV6_DSTOPTS, 0, 0, 0, 0, 0, 0, 0]);
        }
        let t = parse(&ipv6(IPV6_DSTOPTS, &rest), ETH_P_IPV6).unwrap().tuple;
        assert_eq!((t.protocol, t.src_port, t.dst_port), (IPV6_DSTOPTS, 0, 0));
    }

    #[test]
    fn truncated_wrong_version_and_non_ip_packets_are_not_parsed() {
        let mut cut = ipv4(IPPROTO_TCP, 5, 0, &tcp_syn());
        cut.truncate(20 + 10);
        assert!(parse(&cut, ETH_P_IP).is_none(), "a TCP header cut short");
        assert!(parse(&ipv4(IPPROTO_TCP, 5, 0, &tcp_syn())[..15], ETH_P_IP).is_none(), "addresses cut short");
        assert!(parse(&ipv6(IPPROTO_UDP, &[0x1f, 0x90]), ETH_P_IPV6).is_none(), "UDP ports cut short");
        assert!(parse(&ipv4(IPPROTO_TCP, 5, 0, &tcp_syn()), ETH_P_IPV6).is_none(), "IPv4 under the IPv6 type");
        assert!(parse(&ipv6(IPPROTO_TCP, &tcp_syn()), ETH_P_IP).is_none(), "IPv6 under the IPv4 type");
        assert!(parse(&ipv4(IPPROTO_TCP, 5, 0, &tcp_syn()), 0x0806).is_none(), "ARP");
    }
}
