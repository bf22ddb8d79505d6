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
