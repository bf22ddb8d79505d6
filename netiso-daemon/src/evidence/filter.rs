//! Which flow records a query wants: the filters of `netiso observe` and of `GET /v1/flows`, as
//! Hubble's are. Different criteria must all hold; `--not` criteria form an exclusion filter.

use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

use crate::cluster::Identity;
use crate::datapath::record::IpProtocol;
use crate::evidence::record::{FlowRecord, FlowVerdict};
use crate::policy::Labels;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct FlowFilter {
    pub verdict: Option<FlowVerdict>,
    /// Either end.
    pub namespace: Option<String>,
    pub from_namespace: Option<String>,
    pub to_namespace: Option<String>,
    /// Either end.
    pub pod: Option<PodPattern>,
    pub from_pod: Option<PodPattern>,
    pub to_pod: Option<PodPattern>,
    /// Either end.
    pub label: Option<LabelSelector>,
    pub from_label: Option<LabelSelector>,
    pub to_label: Option<LabelSelector>,
    /// Either end.
    pub ip: Option<IpNet>,
    pub from_ip: Option<IpNet>,
    pub to_ip: Option<IpNet>,
    /// Either end (a scan summary's destination ports included).
    pub port: Option<u16>,
    pub from_port: Option<u16>,
    pub to_port: Option<u16>,
    pub protocol: Option<IpProtocol>,
    pub reason: Option<String>,
    /// `namespace/name` of a NetworkPolicy the record names.
    pub policy: Option<String>,
    pub node: Option<NodePattern>,
}

impl FlowFilter {
    pub fn is_empty(&self) -> bool {
        *self == FlowFilter::default()
    }

    pub fn matches(&self, r: &FlowRecord) -> bool {
        let ns = |want: &Option<String>, have: &Option<String>| want.as_ref().is_none_or(|w| have.as_ref() == Some(w));
        let either = |test: &dyn Fn(&Identity) -> bool| test(&r.source) || test(&r.destination);
        let to_port = |p: u16| r.destination.port == p || r.ports.as_ref().is_some_and(|s| s.contains(p));
        self.verdict.is_none_or(|v| v == r.verdict)
            && self.namespace.as_ref().is_none_or(|n| r.namespaces().contains(&n.as_str()))
            && ns(&self.from_namespace, &r.source.namespace)
            && ns(&self.to_namespace, &r.destination.namespace)
            && self.pod.as_ref().is_none_or(|p| either(&|id| p.matches(id)))
            && self.from_pod.as_ref().is_none_or(|p| p.matches(&r.source))
            && self.to_pod.as_ref().is_none_or(|p| p.matches(&r.destination))
            && self.label.as_ref().is_none_or(|s| either(&|id| s.matches(&id.labels)))
            && self.from_label.as_ref().is_none_or(|s| s.matches(&r.source.labels))
            && self.to_label.as_ref().is_none_or(|s| s.matches(&r.destination.labels))
            && self.ip.is_none_or(|net| net.contains(&r.source.ip) || net.contains(&r.destination.ip))
            && self.from_ip.is_none_or(|net| net.contains(&r.source.ip))
            && self.to_ip.is_none_or(|net| net.contains(&r.destination.ip))
            && self.port.is_none_or(|p| r.source.port == p || to_port(p))
            && self.from_port.is_none_or(|p| r.source.port == p)
            && self.to_port.is_none_or(to_port)
            && self.protocol.is_none_or(|p| r.protocol == p)
            && self.reason.as_ref().is_none_or(|x| r.reason.as_ref().is_some_and(|y| y.eq_ignore_ascii_case(x)))
            && self.policy.as_ref().is_none_or(|p| r.policy_keys().contains(p))
            && self.node.as_ref().is_none_or(|n| n.matches(&r.node))
    }
}

/// `dropped`, `DROPPED`, `drop`; `forwarded`, `FORWARDED`, `forward`: what a Hubble user types.
pub fn parse_verdict(text: &str) -> Result<FlowVerdict, String> {
    match text.to_ascii_lowercase().as_str() {
        "dropped" | "drop" => Ok(FlowVerdict::Dropped),
        "forwarded" | "forward" => Ok(FlowVerdict::Forwarded),
        _ => Err(format!("`{text}`: use dropped or forwarded (DROPPED, FORWARDED as Hubble spells them)")),
    }
}

/// `namespace/name-prefix`, `namespace/` (every pod of the namespace), or a name prefix in any
/// namespace: Hubble's `--pod` (`production/api` finds `production/api-7d9f8-x2x4k`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodPattern {
    pub namespace: Option<String>,
    pub name_prefix: String,
}

impl PodPattern {
    pub fn matches(&self, id: &Identity) -> bool {
        let Some(pod) = &id.pod else { return false };
        self.namespace.as_ref().is_none_or(|ns| id.namespace.as_ref() == Some(ns)) && pod.starts_with(&self.name_prefix)
    }

    /// The pod index's keys start with this: `namespace/name-prefix`.
    pub fn key_prefix(&self) -> Option<String> {
        Some(format!("{}/{}", self.namespace.as_ref()?, self.name_prefix))
    }
}

impl FromStr for PodPattern {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.split_once('/') {
            Some(("", _)) => Err(format!("`{text}`: use namespace/pod, namespace/ or a pod name")),
            Some((namespace, name)) => {
                Ok(PodPattern { namespace: Some(namespace.to_owned()), name_prefix: name.to_owned() })
            }
            None if text.is_empty() => Err("empty: use namespace/pod, namespace/ or a pod name".into()),
            None => Ok(PodPattern { namespace: None, name_prefix: text.to_owned() }),
        }
    }
}

/// A label selector as `kubectl -l` takes it: `key=value`, `key==value`, `key!=value`, `key`,
/// `!key`, comma-separated, all of which must hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelSelector(Vec<Requirement>);

#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    Absent(String),
}

impl LabelSelector {
    pub fn matches(&self, labels: &Option<Labels>) -> bool {
        let get = |k: &str| labels.as_ref().and_then(|l| l.get(k));
        self.0.iter().all(|req| match req {
            Requirement::Equals(k, v) => get(k) == Some(v),
            Requirement::NotEquals(k, v) => get(k) != Some(v),
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::Absent(k) => get(k).is_none(),
        })
    }
}

impl FromStr for LabelSelector {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let key = |k: &str| {
            let k = k.trim();
            let valid =
                !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
            if valid { Ok(k.to_owned()) } else { Err(format!("`{text}`: `{k}` is not a label key")) }
        };
        let requirements = text
            .split(',')
            .map(|part| {
                let part = part.trim();
                if let Some((k, v)) = part.split_once("!=") {
                    Ok(Requirement::NotEquals(key(k)?, v.trim().to_owned()))
                } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                    Ok(Requirement::Equals(key(k)?, v.trim().to_owned()))
                } else if let Some(k) = part.strip_prefix('!') {
                    Ok(Requirement::Absent(key(k)?))
                } else {
                    Ok(Requirement::Exists(key(part)?))
                }
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(LabelSelector(requirements))
    }
}

/// A node name, or a pattern with `*` (`worker-*`), as Hubble's `--node-name` takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodePattern(glob::Pattern);

impl NodePattern {
    pub fn matches(&self, node: &str) -> bool {
        self.0.matches(node)
    }
}

impl FromStr for NodePattern {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("empty: use a node name or a pattern like worker-*".into());
        }
        glob::Pattern::new(text).map(NodePattern).map_err(|e| format!("`{text}`: {e}"))
    }
}

/// An address or a CIDR: `10.244.0.10`, `10.244.0.0/16`, `fd00::/64`.
pub fn parse_ip(text: &str) -> Result<IpNet, String> {
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("`{text}` is neither an address nor a CIDR like 10.244.0.0/16"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn record() -> FlowRecord {
        serde_json::from_value(json!({
            "id": "1",
            "time": "2026-12-05T04:17:21Z",
            "last_seen": "2026-12-05T04:17:21Z",
            "node": "worker-2",
            "verdict": "dropped",
            "protocol": "TCP",
            "source": {"kind": "pod", "namespace": "develop", "pod": "debug-6c5f9", "workload": null,
                "labels": {"app": "debug", "tier": "tools"}, "ip": "10.244.1.10", "port": 40009},
            "destination": {"kind": "pod", "namespace": "production", "pod": "api-7d9f8-x2x4k", "workload": null,
                "labels": {"app": "api"}, "ip": "10.244.2.30", "port": 8080},
            "reason": "NETFILTER_DROP",
            "packets": 1,
            "bytes": 60,
            "policy": {"verdict": "denied", "direction": "both", "attribution": "denied_by_network_policy",
                "policies": [{"namespace": "production", "name": "deny"}], "summary": ""},
        }))
        .unwrap()
    }

    fn matches(filter: FlowFilter) -> bool {
        filter.matches(&record())
    }

    #[test]
    fn each_criterion_matches_its_end_or_either() {
        let pod = |t: &str| Some(t.parse::<PodPattern>().unwrap());
        let labels = |t: &str| Some(t.parse::<LabelSelector>().unwrap());
        let ip = |t: &str| Some(parse_ip(t).unwrap());
        let node = |t: &str| Some(t.parse::<NodePattern>().unwrap());
        for (filter, expected) in [
            (FlowFilter { pod: pod("production/api"), ..Default::default() }, true),
            (FlowFilter { pod: pod("debug"), ..Default::default() }, true),
            (FlowFilter { pod: pod("production/"), ..Default::default() }, true),
            (FlowFilter { pod: pod("staging/api"), ..Default::default() }, false),
            (FlowFilter { from_pod: pod("production/api"), ..Default::default() }, false),
            (FlowFilter { to_pod: pod("production/api-7d9f8-x2x4k"), ..Default::default() }, true),
            (FlowFilter { label: labels("app=api"), ..Default::default() }, true),
            (FlowFilter { from_label: labels("app=api"), ..Default::default() }, false),
            (FlowFilter { from_label: labels("app=debug,tier"), ..Default::default() }, true),
            (FlowFilter { from_label: labels("app=debug,!tier"), ..Default::default() }, false),
            (FlowFilter { to_label: labels("app!=debug"), ..Default::default() }, true),
            (FlowFilter { ip: ip("10.244.2.0/24"), ..Default::default() }, true),
            (FlowFilter { ip: ip("10.244.1.10"), ..Default::default() }, true),
            (FlowFilter { to_ip: ip("10.244.1.0/24"), ..Default::default() }, false),
            (FlowFilter { ip: ip("10.245.0.0/16"), ..Default::default() }, false),
            (FlowFilter { port: Some(40009), ..Default::default() }, true),
            (FlowFilter { port: Some(8080), ..Default::default() }, true),
            (FlowFilter { from_port: Some(8080), ..Default::default() }, false),
            (FlowFilter { to_port: Some(8080), ..Default::default() }, true),
            (FlowFilter { node: node("worker-*"), ..Default::default() }, true),
            (FlowFilter { node: node("worker-1"), ..Default::default() }, false),
            (FlowFilter { verdict: Some(parse_verdict("DROPPED").unwrap()), ..Default::default() }, true),
            (FlowFilter { verdict: Some(parse_verdict("forward").unwrap()), ..Default::default() }, false),
            (FlowFilter { reason: Some("netfilter_drop".into()), ..Default::default() }, true),
        ] {
            assert_eq!(matches(filter.clone()), expected, "{filter:?}");
        }
    }

    #[test]
    fn bad_patterns_say_what_to_write() {
        assert!("/api".parse::<PodPattern>().unwrap_err().contains("namespace/pod"));
        assert!("app=,=x".parse::<LabelSelector>().unwrap_err().contains("is not a label key"));
        assert!("worker-[".parse::<NodePattern>().is_err());
        assert!(parse_ip("10.0.0.0/33").unwrap_err().contains("CIDR"));
        assert!(parse_verdict("blocked").unwrap_err().contains("dropped or forwarded"));
    }
}
