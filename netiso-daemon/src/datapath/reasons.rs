//! Drop reason names and classes, resolved from the running kernel: `enum skb_drop_reason`
//! values differ between kernel versions, so no number is compiled in. Kernels before 5.17 give
//! no reason at all; there the reason is inferred from the function that freed the packet, where
//! that function says it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::btf::Btf;

const PREFIX: &str = "SKB_DROP_REASON_";

#[derive(Debug, Error)]
pub enum ReasonError {
    #[error(
        "unknown drop reason or class `{0}`: use a kernel reason name (e.g. NETFILTER_DROP), a class (policy, socket, routing, other, routine), `default` or `all`"
    )]
    UnknownSelector(String),
    #[error(
        "unknown drop reason `{0}`: this kernel gives no drop reasons (they came with Linux 5.17), and netiso infers only {inferable} from where a packet was dropped; select by class (policy, socket, routing, other, routine), `default` or `all`",
        inferable = INFERRED.iter().map(|(_, reason)| *reason).collect::<Vec<_>>().join(", ")
    )]
    NotInferable(String),
}

/// Functions that free packets for one reason, by that reason: what a kernel that gives no
/// reason (before 5.17) still tells. nftables and iptables verdicts free in their hook or table
/// code; tc drops in its ingress and egress hooks; TCP and UDP receive free packets no socket
/// wants (and, rarely, ones with a bad checksum).
const INFERRED: &[(&[&str], &str)] = &[
    (
        &[
            "nft_do_chain",
            "nf_hook_slow",
            "nf_hook_slow_list",
            "ipt_do_table",
            "ip6t_do_table",
            "arpt_do_table",
            "ebt_do_table",
        ],
        "NETFILTER_DROP",
    ),
    (&["sch_handle_ingress"], "TC_INGRESS"),
    (&["sch_handle_egress"], "TC_EGRESS"),
    (&["tcp_v4_rcv", "tcp_v6_rcv", "__udp4_lib_rcv", "__udp6_lib_rcv"], "NO_SOCKET"),
];

/// The reason a drop at `location` (`symbol+0xoffset`) implies, where its function implies one.
pub fn infer(location: &str) -> Option<&'static str> {
    let function = location.split_once('+').map_or(location, |(f, _)| f);
    INFERRED.iter().find(|(functions, _)| functions.contains(&function)).map(|(_, reason)| *reason)
}

/// What kind of thing dropped the packet; decides whether NetworkPolicy can explain it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReasonClass {
    /// netfilter (iptables/nftables) and tc/BPF programs: where CNIs enforce NetworkPolicy.
    Policy,
    /// No listener, socket filters, receive buffers: the destination refused or could not take it.
    Socket,
    /// No route, reverse-path filter, neighbour resolution, bad addresses.
    Routing,
    /// Normal lifecycle frees (connection teardown, duplicate data): not a connectivity problem.
    Routine,
    Other,
}

impl ReasonClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ReasonClass::Policy => "policy",
            ReasonClass::Socket => "socket",
            ReasonClass::Routing => "routing",
            ReasonClass::Routine => "routine",
            ReasonClass::Other => "other",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [Self::Policy, Self::Socket, Self::Routing, Self::Routine, Self::Other].into_iter().find(|c| c.as_str() == s)
    }
}

/// Classifies a reason by its kernel name (without the `SKB_DROP_REASON_` prefix).
pub fn classify(name: &str) -> ReasonClass {
    const ROUTINE: &[&str] = &[
        "NOT_DROPPED_YET",
        "CONSUMED",
        "NOT_SPECIFIED",
        "SOCKET_CLOSE",
        "TCP_CLOSE",
        "TCP_OLD_DATA",
        "TCP_OLD_SEQUENCE",
        "TCP_OFOMERGE",
        "TCP_OLD_ACK",
        "TCP_TOO_OLD_ACK",
        "TCP_ACK_UNSENT_DATA",
        "TCP_OFO_QUEUE_PRUNE",
        "TCP_OFO_DROP",
        "TCP_ZEROWINDOW",
        "TCP_OVERWINDOW",
        "TCP_RFC7323_PAWS",
        "TCP_RFC7323_PAWS_ACK",
        "TCP_RFC7323_TW_PAWS",
        "TCP_RFC7323_TSECR",
        "QUEUE_PURGE",
        "DUP_FRAG",
        "UNIX_DISCONNECT",
        "UNIX_SKIP_OOB",
        "MAX",
    ];
    const POLICY: &[&str] = &[
        "NETFILTER_DROP",
        "TC_INGRESS",
        "TC_EGRESS",
        "TC_COOKIE_ERROR",
        "TC_CHAIN_NOTFOUND",
        "TC_RECLASSIFY_LOOP",
        "BPF_CGROUP_EGRESS",
        "XDP",
        "SECURITY_HOOK",
    ];
    const ROUTING: &[&str] = &[
        "IP_OUTNOROUTES",
        "IP_INNOROUTES",
        "IP_RPFILTER",
        "IP_INADDRERRORS",
        "IP_LOCAL_SOURCE",
        "IP_INVALID_SOURCE",
        "IP_LOCALNET",
        "IP_INVALID_DEST",
        "OTHERHOST",
        "PKT_TOO_BIG",
        "NO_TX_TARGET",
        "IPV6DISABLED",
    ];
    if ROUTINE.contains(&name) {
        ReasonClass::Routine
    } else if POLICY.contains(&name) {
        ReasonClass::Policy
    } else if ROUTING.contains(&name) || name.starts_with("NEIGH_") {
        ReasonClass::Routing
    } else if name == "NO_SOCKET"
        || name.starts_with("SOCKET_")
        || name == "PROTO_MEM"
        || name == "TCP_LISTEN_OVERFLOW"
        || name == "UDP_CSUM"
        || name == "TCP_CSUM"
    {
        ReasonClass::Socket
    } else {
        ReasonClass::Other
    }
}

/// A drop reason in words, for people reading a flow (the kernel's names are terse); none for a
/// reason this table does not know.
pub fn describe(name: &str) -> Option<&'static str> {
    const WORDS: &[(&str, &str)] = &[
        ("NOT_SPECIFIED", "no reason given"),
        ("NO_SOCKET", "nothing listens on the port"),
        ("PKT_TOO_SMALL", "packet too short"),
        ("TCP_CSUM", "bad TCP checksum"),
        ("UDP_CSUM", "bad UDP checksum"),
        ("ICMP_CSUM", "bad ICMP checksum"),
        ("IP_CSUM", "bad IP checksum"),
        ("SOCKET_FILTER", "a socket filter refused it"),
        ("SOCKET_RCVBUFF", "the socket's receive buffer is full"),
        ("SOCKET_BACKLOG", "the socket's backlog is full"),
        ("SOCKET_CLOSE", "the socket closed"),
        ("PROTO_MEM", "the protocol's memory limit is reached"),
        ("TCP_LISTEN_OVERFLOW", "the listener's accept queue is full"),
        ("NETFILTER_DROP", "a netfilter rule dropped it"),
        ("TC_INGRESS", "a tc program dropped it on ingress"),
        ("TC_EGRESS", "a tc program dropped it on egress"),
        ("TC_COOKIE_ERROR", "tc classification failed"),
        ("TC_CHAIN_NOTFOUND", "tc classification failed"),
        ("TC_RECLASSIFY_LOOP", "tc classification looped"),
        ("BPF_CGROUP_EGRESS", "a cgroup BPF program dropped it"),
        ("XDP", "an XDP program dropped it"),
        ("SECURITY_HOOK", "a security module dropped it"),
        ("XFRM_POLICY", "an IPsec policy dropped it"),
        ("OTHERHOST", "addressed to another host's MAC"),
        ("IP_INHDR", "bad IP header"),
        ("IP_RPFILTER", "the reverse path filter refused it"),
        ("UNICAST_IN_L2_MULTICAST", "unicast IP in a multicast frame"),
        ("IP_NOPROTO", "no handler for the IP protocol"),
        ("IP_OUTNOROUTES", "no route to the destination"),
        ("IP_INNOROUTES", "no route for the packet"),
        ("IP_INADDRERRORS", "invalid destination address"),
        ("IP_LOCAL_SOURCE", "the source address is local"),
        ("IP_INVALID_SOURCE", "invalid source address"),
        ("IP_LOCALNET", "a local network address where none may be"),
        ("IP_INVALID_DEST", "invalid destination address"),
        ("IPV6DISABLED", "IPv6 is disabled"),
        ("PKT_TOO_BIG", "larger than the MTU"),
        ("NO_TX_TARGET", "no device to send it on"),
        ("NEIGH_CREATEFAIL", "no neighbour entry could be made"),
        ("NEIGH_FAILED", "neighbour (ARP/NDP) resolution failed"),
        ("NEIGH_QUEUEFULL", "the neighbour queue is full"),
        ("NEIGH_DEAD", "the neighbour entry is gone"),
        ("QDISC_DROP", "the queue discipline dropped it"),
        ("CPU_BACKLOG", "the CPU's backlog is full"),
        ("DEV_READY", "the device is down"),
        ("FULL_RING", "the device's ring is full"),
        ("NOMEM", "out of memory"),
        ("HDR_TRUNC", "truncated header"),
        ("DUP_FRAG", "duplicate fragment"),
        ("FRAG_REASM_TIMEOUT", "fragment reassembly timed out"),
        ("TCP_FLAGS", "invalid TCP flags"),
        ("TCP_INVALID_SEQUENCE", "TCP sequence number out of window"),
        ("TCP_INVALID_SYN", "unexpected TCP SYN"),
        ("TCP_RESET", "TCP connection reset"),
        ("TCP_CLOSE", "TCP connection closed"),
        ("TCP_OLD_DATA", "TCP data already received"),
        ("TCP_ZEROWINDOW", "the TCP window is zero"),
        ("TCP_OVERWINDOW", "TCP data beyond the window"),
        ("TCP_MINTTL", "TTL below the socket's minimum"),
    ];
    WORDS.iter().find(|(reason, _)| *reason == name).map(|(_, words)| *words)
}

/// The running kernel's drop reasons: value → name.
#[derive(Clone, Debug)]
pub struct DropReasons {
    names: BTreeMap<u32, String>,
}

impl DropReasons {
    /// The running kernel's `enum skb_drop_reason`: empty before 5.17, which has none.
    pub fn from_btf(btf: &Btf) -> Self {
        let names = btf
            .enum_values("skb_drop_reason")
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(name, value)| {
                let short = name.strip_prefix(PREFIX).unwrap_or(&name).to_owned();
                u32::try_from(value).ok().map(|v| (v, short))
            })
            .collect();
        DropReasons { names }
    }

    pub fn name(&self, value: u32) -> String {
        self.names.get(&value).cloned().unwrap_or_else(|| format!("REASON_{value}"))
    }

    pub fn iter(&self) -> impl Iterator<Item = (u32, &str)> {
        self.names.iter().map(|(v, n)| (*v, n.as_str()))
    }

    /// Whether the kernel gives drop reasons (Linux >= 5.17).
    pub fn given(&self) -> bool {
        !self.names.is_empty()
    }

    /// The reason values `selection` keeps, for the kernel's filter.
    pub fn kept_values(&self, selection: &ReasonSelection) -> Vec<u32> {
        self.iter().filter(|(_, name)| selection.keeps(Some(name))).map(|(value, _)| value).collect()
    }
}

/// A `--drop-reasons` selection: comma-separated reason names, classes, `default` (all but routine
/// frees) and `all`.
#[derive(Clone, Debug)]
pub struct ReasonSelection {
    items: Vec<SelectionItem>,
}

#[derive(Clone, Debug)]
enum SelectionItem {
    All,
    Default,
    Class(ReasonClass),
    Name(String),
}

impl ReasonSelection {
    /// Names must be ones the kernel gives, or, on a kernel that gives none, ones netiso infers.
    pub fn parse(selection: &str, reasons: &DropReasons) -> Result<Self, ReasonError> {
        let mut items = Vec::new();
        for item in selection.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            items.push(match item {
                "all" => SelectionItem::All,
                "default" => SelectionItem::Default,
                _ => match ReasonClass::parse(item) {
                    Some(class) => SelectionItem::Class(class),
                    None => {
                        let name = item.strip_prefix(PREFIX).unwrap_or(item);
                        let known = if reasons.given() {
                            reasons.iter().any(|(_, n)| n == name)
                        } else {
                            INFERRED.iter().any(|(_, reason)| *reason == name)
                        };
                        if !known && reasons.given() {
                            return Err(ReasonError::UnknownSelector(item.to_owned()));
                        }
                        if !known {
                            return Err(ReasonError::NotInferable(item.to_owned()));
                        }
                        SelectionItem::Name(name.to_owned())
                    }
                },
            });
        }
        Ok(ReasonSelection { items })
    }

    /// Whether a drop with reason `name` (None: unknown, of class other) is kept.
    pub fn keeps(&self, name: Option<&str>) -> bool {
        let class = name.map_or(ReasonClass::Other, classify);
        self.items.iter().any(|item| match item {
            SelectionItem::All => true,
            SelectionItem::Default => class != ReasonClass::Routine,
            SelectionItem::Class(c) => *c == class,
            SelectionItem::Name(n) => Some(n.as_str()) == name,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DropReasons {
        let names =
            [(2, "NOT_SPECIFIED"), (3, "NO_SOCKET"), (12, "NETFILTER_DROP"), (47, "TCP_CLOSE"), (54, "IP_OUTNOROUTES")];
        DropReasons { names: names.into_iter().map(|(v, n)| (v, n.to_owned())).collect() }
    }

    #[test]
    fn names_by_value() {
        let r = sample();
        assert_eq!(r.name(12), "NETFILTER_DROP");
        assert_eq!(r.name(3), "NO_SOCKET");
        assert_eq!(r.name(999), "REASON_999");
    }

    #[test]
    fn default_selection_skips_routine_frees() {
        let r = sample();
        let kept = |selection: &str| r.kept_values(&ReasonSelection::parse(selection, &r).unwrap());
        assert_eq!(kept("default"), vec![3, 12, 54]);
        assert_eq!(kept("all"), vec![2, 3, 12, 47, 54]);
        assert_eq!(kept("policy,TCP_CLOSE"), vec![12, 47]);
        assert!(matches!(ReasonSelection::parse("NETFLITER_DROP", &r), Err(ReasonError::UnknownSelector(_))));
    }

    #[test]
    fn without_kernel_reasons_the_location_says_what_it_can() {
        assert_eq!(infer("nft_do_chain+0x3e8"), Some("NETFILTER_DROP"));
        assert_eq!(infer("nf_hook_slow+0x9b"), Some("NETFILTER_DROP"));
        assert_eq!(infer("ipt_do_table+0x2f1"), Some("NETFILTER_DROP"));
        assert_eq!(infer("__udp4_lib_rcv+0x5c4"), Some("NO_SOCKET"));
        assert_eq!(infer("sch_handle_ingress+0x10"), Some("TC_INGRESS"));
        assert_eq!(infer("skb_release_data+0x1"), None);
        assert_eq!(infer("0xffffffff81000000"), None);

        let none = DropReasons { names: BTreeMap::new() };
        assert!(!none.given());
        let default = ReasonSelection::parse("default", &none).unwrap();
        assert!(default.keeps(Some("NETFILTER_DROP")) && default.keeps(None), "unknown reasons are kept by default");
        let policy = ReasonSelection::parse("policy", &none).unwrap();
        assert!(policy.keeps(Some("NETFILTER_DROP")) && !policy.keeps(Some("NO_SOCKET")) && !policy.keeps(None));
        let named = ReasonSelection::parse("NETFILTER_DROP", &none).unwrap();
        assert!(named.keeps(Some("NETFILTER_DROP")) && !named.keeps(None));
        let err = ReasonSelection::parse("IP_RPFILTER", &none).unwrap_err();
        assert!(matches!(err, ReasonError::NotInferable(_)));
        assert!(err.to_string().contains("5.17") && err.to_string().contains("NETFILTER_DROP"), "{err}");
    }

    #[test]
    fn classes() {
        assert_eq!(classify("NETFILTER_DROP"), ReasonClass::Policy);
        assert_eq!(classify("TC_INGRESS"), ReasonClass::Policy);
        assert_eq!(classify("NO_SOCKET"), ReasonClass::Socket);
        assert_eq!(classify("NEIGH_FAILED"), ReasonClass::Routing);
        assert_eq!(classify("TCP_CLOSE"), ReasonClass::Routine);
        assert_eq!(classify("SKB_CSUM"), ReasonClass::Other);
    }

    #[test]
    fn the_running_kernels_reasons_come_from_btf() {
        let btf = Btf::parse(&std::fs::read("/sys/kernel/btf/vmlinux").unwrap()).unwrap();
        let reasons = DropReasons::from_btf(&btf);
        assert!(reasons.iter().any(|(_, n)| n == "NETFILTER_DROP"));
        assert!(reasons.iter().any(|(_, n)| n == "NO_SOCKET"));
    }
}
