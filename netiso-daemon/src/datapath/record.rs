//! The raw datapath stream: one record per newly seen drop key or flow key, before any identity
//! is attached. Later stages build on this type; its JSON form is the `netiso run` log line.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::SystemTime;

use netiso_common::{
    DIRECTION_FROM_POD, DIRECTION_TO_POD, FlowTuple, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP,
    IPPROTO_UDP,
};
use serde::{Deserialize, Serialize, Serializer};

use super::reasons::ReasonClass;
use crate::cluster::Protocol;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Drop,
    Flow,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// The packet left the pod (tc ingress of the host-side veth).
    FromPod,
    /// The packet entered the pod (tc egress of the host-side veth).
    ToPod,
}

impl Direction {
    pub fn from_raw(raw: u8) -> Option<Self> {
        match raw {
            DIRECTION_FROM_POD => Some(Direction::FromPod),
            DIRECTION_TO_POD => Some(Direction::ToPod),
            _ => None,
        }
    }
}

/// A flow's IP protocol, spelled in records as Kubernetes and Hubble do: `TCP`, `UDP`, `SCTP`,
/// `ICMP`, `ICMPv6`, or `IP-<number>` for the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpProtocol {
    Tcp,
    Udp,
    Sctp,
    Icmp,
    Icmpv6,
    Other(u8),
}

impl IpProtocol {
    pub fn from_number(number: u8) -> Self {
        match number {
            IPPROTO_TCP => IpProtocol::Tcp,
            IPPROTO_UDP => IpProtocol::Udp,
            IPPROTO_SCTP => IpProtocol::Sctp,
            IPPROTO_ICMP => IpProtocol::Icmp,
            IPPROTO_ICMPV6 => IpProtocol::Icmpv6,
            other => IpProtocol::Other(other),
        }
    }

    /// The protocol as NetworkPolicy names it; none for those it does not govern.
    pub fn policy(self) -> Option<Protocol> {
        match self {
            IpProtocol::Tcp => Some(Protocol::Tcp),
            IpProtocol::Udp => Some(Protocol::Udp),
            IpProtocol::Sctp => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for IpProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IpProtocol::Tcp => f.write_str("TCP"),
            IpProtocol::Udp => f.write_str("UDP"),
            IpProtocol::Sctp => f.write_str("SCTP"),
            IpProtocol::Icmp => f.write_str("ICMP"),
            IpProtocol::Icmpv6 => f.write_str("ICMPv6"),
            IpProtocol::Other(number) => write!(f, "IP-{number}"),
        }
    }
}

impl FromStr for IpProtocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.to_ascii_uppercase().as_str() {
            "TCP" => IpProtocol::Tcp,
            "UDP" => IpProtocol::Udp,
            "SCTP" => IpProtocol::Sctp,
            "ICMP" => IpProtocol::Icmp,
            "ICMPV6" => IpProtocol::Icmpv6,
            other => {
                other.strip_prefix("IP-").and_then(|n| n.parse().ok()).map(IpProtocol::from_number).ok_or_else(
                    || format!("`{s}` is not a protocol: use TCP, UDP, SCTP, ICMP, ICMPv6 or IP-<number>"),
                )?
            }
        })
    }
}

impl Serialize for IpProtocol {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IpProtocol {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

pub fn tuple_addrs(tuple: &FlowTuple) -> (IpAddr, IpAddr) {
    let addr = |raw: [u8; 16]| {
        let v6 = std::net::Ipv6Addr::from(raw);
        match (tuple.family, v6.to_ipv4_mapped()) {
            (4, Some(v4)) => IpAddr::V4(v4),
            _ => IpAddr::V6(v6),
        }
    };
    (addr(tuple.src_addr), addr(tuple.dst_addr))
}

fn rfc3339<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_rfc3339_nanos(*t).to_string())
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DatapathRecord {
    pub event: EventKind,
    /// When the key's first packet was seen.
    #[serde(serialize_with = "rfc3339")]
    pub time: SystemTime,
    /// When its latest packet was seen.
    #[serde(serialize_with = "rfc3339")]
    pub last_seen: SystemTime,
    pub src_ip: IpAddr,
    pub dst_ip: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    pub protocol: IpProtocol,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp_type: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp_code: Option<u8>,
    /// Drops: the kernel's `skb_drop_reason` name, e.g. `NETFILTER_DROP`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason_class: Option<ReasonClass>,
    /// Drops on kernels that give no reason (before 5.17): `reason` was inferred from `location`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub reason_inferred: bool,
    /// Drops: `symbol+0xoffset` of the kernel code that freed the packet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// Drops in a pod's network namespace rather than the node's: its name under /run/netns (the
    /// interface is named as it is there).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// Flows: which way the packet crossed the pod's interface.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direction: Option<Direction>,
    pub ifindex: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// Counts so far for this key.
    pub packets: u64,
    pub bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_flags: Option<String>,
    /// True when the kernel map was full: this record stands for packets that have no map entry.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub overflow: bool,
    /// The key was first seen (since it was last evicted): the records `netiso run` prints.
    #[serde(skip)]
    pub new_key: bool,
    /// Packets and bytes since the previous record of this key, for counters downstream.
    #[serde(skip)]
    pub delta_packets: u64,
    #[serde(skip)]
    pub delta_bytes: u64,
}

impl DatapathRecord {
    pub fn with_change(mut self, new_key: bool, delta_packets: u64, delta_bytes: u64) -> Self {
        self.new_key = new_key;
        self.delta_packets = delta_packets;
        self.delta_bytes = delta_bytes;
        self
    }
}

/// TCP flags as tcpdump prints them (`SYN|ACK`).
pub fn tcp_flag_names(flags: u8) -> String {
    const NAMES: [(u8, &str); 8] = [
        (0x01, "FIN"),
        (0x02, "SYN"),
        (0x04, "RST"),
        (0x08, "PSH"),
        (0x10, "ACK"),
        (0x20, "URG"),
        (0x40, "ECE"),
        (0x80, "CWR"),
    ];
    NAMES.iter().filter(|(bit, _)| flags & bit != 0).map(|(_, n)| *n).collect::<Vec<_>>().join("|")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_mapped_addresses_come_back_as_ipv4() {
        let mut t = FlowTuple { family: 4, ..Default::default() };
        t.src_addr[10..16].copy_from_slice(&[0xff, 0xff, 10, 1, 2, 3]);
        t.dst_addr[10..16].copy_from_slice(&[0xff, 0xff, 10, 1, 2, 4]);
        let (s, d) = tuple_addrs(&t);
        assert_eq!(s.to_string(), "10.1.2.3");
        assert_eq!(d.to_string(), "10.1.2.4");
        let v6 = FlowTuple { family: 6, src_addr: std::net::Ipv6Addr::LOCALHOST.octets(), ..Default::default() };
        assert_eq!(tuple_addrs(&v6).0.to_string(), "::1");
    }

    #[test]
    fn flag_names() {
        assert_eq!(tcp_flag_names(0x12), "SYN|ACK");
        assert_eq!(tcp_flag_names(0), "");
    }

    #[test]
    fn protocols_are_named_and_read_back() {
        for number in 0..=u8::MAX {
            let protocol = IpProtocol::from_number(number);
            assert_eq!(protocol.to_string().parse::<IpProtocol>(), Ok(protocol), "{protocol}");
        }
        assert_eq!(IpProtocol::from_number(58).to_string(), "ICMPv6");
        assert_eq!(IpProtocol::from_number(47).to_string(), "IP-47");
        assert_eq!("tcp".parse(), Ok(IpProtocol::Tcp));
        assert!("IP-300".parse::<IpProtocol>().is_err());
        assert_eq!(IpProtocol::Icmp.policy(), None);
    }
}
