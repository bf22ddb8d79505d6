//! Drop reason names and classes, resolved from the running kernel: `enum skb_drop_reason`
//! values differ between kernel versions, so no number is compiled in.

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

    /// Reason values kept by a comma-separated selection of names, classes, `default` (all but
    /// routine frees) and `all`.
    pub fn select(&self, selection: &str) -> Result<Vec<u32>, ReasonError> {
        let mut keep = std::collections::BTreeSet::new();
        for item in selection.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let matched: Vec<u32> = match item {
                "all" => self.names.keys().copied().collect(),
                "default" => self.iter().filter(|(_, n)| classify(n) != ReasonClass::Routine).map(|(v, _)| v).collect(),
                _ => match ReasonClass::parse(item) {
                    Some(class) => self.iter().filter(|(_, n)| classify(n) == class).map(|(v, _)| v).collect(),
                    None => {
                        let name = item.strip_prefix(PREFIX).unwrap_or(item);
                        let found: Vec<u32> = self.iter().filter(|(_, n)| *n == name).map(|(v, _)| v).collect();
                        if found.is_empty() {
                            return Err(ReasonError::UnknownSelector(item.to_owned()));
                        }
                        found
                    }
                },
            };
            keep.extend(matched);
        }
        Ok(keep.into_iter().collect())
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
        assert_eq!(r.select("default").unwrap(), vec![3, 12, 54]);
        assert_eq!(r.select("all").unwrap(), vec![2, 3, 12, 47, 54]);
        assert_eq!(r.select("policy,TCP_CLOSE").unwrap(), vec![12, 47]);
        assert!(matches!(r.select("NETFLITER_DROP"), Err(ReasonError::UnknownSelector(_))));
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
