//! Why the engine decided as it did: per direction, the policies that isolate the subject, the
//! rules that admit the flow, or the nearest misses and what each lacked.

use std::net::IpAddr;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::{Deserialize, Serialize};

use super::compile::{CompiledPolicy, NamespaceScope, Peer, PolicyRef, PortMatch, PortSpec};
use super::engine::{Direction, Endpoint, EngineError, PolicyEngine, RuleOutcome, Verdict, rules};
use super::model::{Flow, Labels, Protocol};
use super::selector::LabelMiss;

impl PolicyEngine {
    /// The verdict with its full explanation.
    pub fn explain(&self, flow: &Flow) -> Result<Explanation, EngineError> {
        let from = self.resolve(&flow.from)?;
        let to = self.resolve(&flow.to)?;
        let egress = self.report(Direction::Egress, from, to, flow.port, flow.protocol);
        let ingress = self.report(Direction::Ingress, to, from, flow.port, flow.protocol);
        let verdict = if egress.verdict == Verdict::Allowed && ingress.verdict == Verdict::Allowed {
            Verdict::Allowed
        } else {
            Verdict::Denied
        };
        Ok(Explanation {
            verdict,
            flow: FlowView { from: self.view(from), to: self.view(to), port: flow.port, protocol: flow.protocol },
            egress,
            ingress,
            suggestion: None,
        })
    }

    fn view(&self, endpoint: Endpoint) -> EndpointView {
        match endpoint {
            Endpoint::Pod { index, ip } => {
                let pod = &self.pods[index as usize];
                EndpointView {
                    namespace: Some(pod.namespace.clone()),
                    pod: Some(pod.name.clone()),
                    ip,
                    labels: Some(pod.labels.clone()),
                    namespace_labels: self.namespaces.get(&pod.namespace).cloned(),
                }
            }
            Endpoint::Ip(ip) => {
                EndpointView { namespace: None, pod: None, ip: Some(ip), labels: None, namespace_labels: None }
            }
        }
    }

    fn report(
        &self,
        direction: Direction,
        subject: Endpoint,
        peer: Endpoint,
        port: u16,
        protocol: Protocol,
    ) -> DirectionReport {
        let dir = direction.as_str();
        let Some(subject_index) = subject.pod_index() else {
            let who = subject.ip().map(|ip| ip.to_string()).unwrap_or_default();
            return DirectionReport {
                direction,
                subject: None,
                isolated: false,
                isolating_policies: vec![],
                verdict: Verdict::Allowed,
                allowed_by: vec![],
                nearest_misses: vec![],
                own_node: None,
                summary: format!("{who} is not a pod: no NetworkPolicy governs its {dir}"),
            };
        };
        let subject_pod = &self.pods[subject_index];
        let governing = self.governing(direction, subject_index);
        let isolating_policies: Vec<PolicyRef> =
            governing.iter().map(|&p| self.policies[p as usize].reference.clone()).collect();
        if governing.is_empty() {
            return DirectionReport {
                direction,
                subject: Some(subject_pod.key()),
                isolated: false,
                isolating_policies,
                verdict: Verdict::Allowed,
                allowed_by: vec![],
                nearest_misses: vec![],
                own_node: None,
                summary: format!("no NetworkPolicy selects {} for {dir}: {dir} is not isolated", subject_pod.key()),
            };
        }
        if let Some(node) = self.own_node(subject_index, peer) {
            return DirectionReport {
                direction,
                subject: Some(subject_pod.key()),
                isolated: true,
                isolating_policies,
                verdict: Verdict::Allowed,
                allowed_by: vec![],
                nearest_misses: vec![],
                own_node: Some(node.to_owned()),
                summary: format!(
                    "{} is node {node}, which {} runs on: traffic between a pod and its own node is always allowed",
                    self.endpoint_name(peer),
                    subject_pod.key()
                ),
            };
        }
        let mut allowed_by = Vec::new();
        let mut nearest_misses = Vec::new();
        for &p in governing {
            let policy = &self.policies[p as usize];
            let mut best: Option<(u8, usize, RuleOutcome)> = None;
            for (ri, rule) in rules(policy, direction).iter().enumerate() {
                let outcome = self.rule_outcome(policy, rule, direction, subject_index, peer, port, protocol);
                if outcome.matched() {
                    allowed_by.push(RuleRef {
                        policy: policy.reference.clone(),
                        rule: ri,
                        peer: outcome.peer.filter(|&i| i != usize::MAX),
                        port: outcome.port.filter(|&i| i != usize::MAX),
                    });
                    continue;
                }
                let misses = u8::from(outcome.peer.is_none()) + u8::from(outcome.port.is_none());
                if best.is_none_or(|(m, _, _)| misses < m) {
                    best = Some((misses, ri, outcome));
                }
            }
            if allowed_by.iter().any(|r| r.policy == policy.reference) {
                continue;
            }
            nearest_misses.push(match best {
                None => NearestMiss {
                    policy: policy.reference.clone(),
                    rule: None,
                    kind: MissKind::NoRules,
                    peer_misses: vec![],
                    port_miss: None,
                    summary: format!(
                        "{} isolates {} for {dir} and allows no {dir} at all (default deny)",
                        policy.reference,
                        subject_pod.key()
                    ),
                },
                Some((_, ri, outcome)) => self.nearest_miss(policy, ri, outcome, direction, peer, port, protocol),
            });
        }
        let verdict = if allowed_by.is_empty() { Verdict::Denied } else { Verdict::Allowed };
        let summary = match verdict {
            Verdict::Allowed => {
                let names: Vec<String> = allowed_by.iter().map(|r| format!("{} rule {}", r.policy, r.rule)).collect();
                format!("{dir} of {} allowed by {}", subject_pod.key(), names.join(", "))
            }
            Verdict::Denied => format!(
                "{dir} of {} denied: {} isolating {} and none of {} rules admits this flow",
                subject_pod.key(),
                isolating_policies.len(),
                if isolating_policies.len() == 1 { "policy" } else { "policies" },
                if isolating_policies.len() == 1 { "its" } else { "their" },
            ),
        };
        DirectionReport {
            direction,
            subject: Some(subject_pod.key()),
            isolated: true,
            isolating_policies,
            verdict,
            allowed_by,
            nearest_misses,
            own_node: None,
            summary,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn nearest_miss(
        &self,
        policy: &CompiledPolicy,
        rule_index: usize,
        outcome: RuleOutcome,
        direction: Direction,
        peer: Endpoint,
        port: u16,
        protocol: Protocol,
    ) -> NearestMiss {
        let rule = &rules(policy, direction)[rule_index];
        let peer_name = self.endpoint_name(peer);
        let flow_port = format!("{protocol}/{port}");
        let peer_misses = if outcome.peer.is_none() {
            rule.peers.iter().flatten().enumerate().map(|(i, p)| self.peer_miss(policy, i, p, peer)).collect()
        } else {
            vec![]
        };
        let allowed_ports = || rule.ports.iter().flatten().map(describe_port).collect::<Vec<_>>().join(", ");
        let port_miss = outcome
            .port
            .is_none()
            .then(|| format!("the rule allows {} only; the flow is {flow_port}", allowed_ports()));
        let peer_side = match direction {
            Direction::Ingress => "from",
            Direction::Egress => "to",
        };
        let (kind, summary) = match (outcome.peer.is_some(), outcome.port.is_some()) {
            (true, false) => (
                MissKind::PortOnly,
                format!(
                    "{} rule {rule_index} admits {peer_name} but only on {}; the flow is {flow_port}",
                    policy.reference,
                    allowed_ports()
                ),
            ),
            (false, true) => (
                MissKind::PeerOnly,
                format!(
                    "{} rule {rule_index} allows {flow_port} but not {peer_side} {peer_name}: {}",
                    policy.reference,
                    peer_misses.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
                ),
            ),
            _ => (
                MissKind::PeerAndPort,
                format!(
                    "{} rule {rule_index} matches neither the peer nor the port: {}; it allows {} only",
                    policy.reference,
                    peer_misses.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
                    allowed_ports()
                ),
            ),
        };
        NearestMiss { policy: policy.reference.clone(), rule: Some(rule_index), kind, peer_misses, port_miss, summary }
    }

    fn endpoint_name(&self, endpoint: Endpoint) -> String {
        match endpoint {
            Endpoint::Pod { index, .. } => self.pods[index as usize].key(),
            Endpoint::Ip(ip) => ip.to_string(),
        }
    }

    fn peer_miss(&self, policy: &CompiledPolicy, index: usize, peer: &Peer, endpoint: Endpoint) -> PeerMiss {
        match peer {
            Peer::Pods { namespaces, pods } => {
                let Some(pod_index) = endpoint.pod_index() else {
                    return PeerMiss::NotAPod { peer: index, ip: endpoint.ip() };
                };
                let pod = &self.pods[pod_index];
                match namespaces {
                    NamespaceScope::PolicyNamespace if pod.namespace != policy.namespace() => {
                        return PeerMiss::OtherNamespace {
                            peer: index,
                            expected: policy.namespace().to_owned(),
                            actual: pod.namespace.clone(),
                        };
                    }
                    NamespaceScope::Selector(s) => {
                        let labels = self.namespaces.get(&pod.namespace).cloned().unwrap_or_default();
                        let misses = s.misses(&labels);
                        if !misses.is_empty() {
                            return PeerMiss::NamespaceLabels { peer: index, namespace: pod.namespace.clone(), misses };
                        }
                    }
                    NamespaceScope::PolicyNamespace => {}
                }
                PeerMiss::PodLabels { peer: index, pod: pod.key(), misses: pods.misses(&pod.labels) }
            }
            Peer::IpBlock { cidr, except } => match endpoint.ip() {
                None => PeerMiss::NoAddress { peer: index },
                Some(ip) if !cidr.contains(&ip) => PeerMiss::OutsideCidr { peer: index, ip, cidr: cidr.to_string() },
                Some(ip) => PeerMiss::Excepted {
                    peer: index,
                    ip,
                    except: except.iter().find(|e| e.contains(&ip)).map(ToString::to_string).unwrap_or_default(),
                },
            },
            Peer::Invalid => PeerMiss::Invalid { peer: index },
        }
    }
}

pub fn describe_port(spec: &PortSpec) -> String {
    match &spec.port {
        PortMatch::Any => format!("all {} ports", spec.protocol),
        PortMatch::Range(lo, hi) if lo == hi => format!("{}/{lo}", spec.protocol),
        PortMatch::Range(lo, hi) => format!("{}/{lo}-{hi}", spec.protocol),
        PortMatch::Named(name) => format!("{}/{name} (named)", spec.protocol),
        PortMatch::Invalid => format!("{}/<invalid>", spec.protocol),
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Explanation {
    pub verdict: Verdict,
    pub flow: FlowView,
    /// The source pod's egress policies.
    pub egress: DirectionReport,
    /// The destination pod's ingress policies.
    pub ingress: DirectionReport,
    /// For a denied flow, when asked for (`suggest::explain_with_suggestion`): the minimal
    /// policies that would allow exactly it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suggestion: Option<Suggestion>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Suggestion {
    pub policies: Vec<NetworkPolicy>,
    /// The policies as one multi-document YAML, ready for `kubectl apply -f -`.
    pub yaml: String,
    /// True when the engine confirmed that adding the policies allows the flow.
    pub verified: bool,
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlowView {
    pub from: EndpointView,
    pub to: EndpointView,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EndpointView {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels: Option<Labels>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace_labels: Option<Labels>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DirectionReport {
    pub direction: Direction,
    /// `namespace/pod` whose policies decide this direction; none for a non-pod end.
    pub subject: Option<String>,
    pub isolated: bool,
    pub isolating_policies: Vec<PolicyRef>,
    pub verdict: Verdict,
    pub allowed_by: Vec<RuleRef>,
    pub nearest_misses: Vec<NearestMiss>,
    /// The subject's own node, when that is the peer: allowed whatever the policies say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub own_node: Option<String>,
    pub summary: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RuleRef {
    pub policy: PolicyRef,
    pub rule: usize,
    /// Index of the matching peer; none when the rule admits every peer.
    pub peer: Option<usize>,
    /// Index of the matching port; none when the rule admits every port.
    pub port: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissKind {
    /// The policy has no rules for this direction: a default deny.
    NoRules,
    /// A rule admits the peer but not the port.
    PortOnly,
    /// A rule admits the port but not the peer.
    PeerOnly,
    PeerAndPort,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NearestMiss {
    pub policy: PolicyRef,
    pub rule: Option<usize>,
    pub kind: MissKind,
    pub peer_misses: Vec<PeerMiss>,
    pub port_miss: Option<String>,
    pub summary: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PeerMiss {
    NotAPod { peer: usize, ip: Option<IpAddr> },
    OtherNamespace { peer: usize, expected: String, actual: String },
    NamespaceLabels { peer: usize, namespace: String, misses: Vec<LabelMiss> },
    PodLabels { peer: usize, pod: String, misses: Vec<LabelMiss> },
    OutsideCidr { peer: usize, ip: IpAddr, cidr: String },
    Excepted { peer: usize, ip: IpAddr, except: String },
    NoAddress { peer: usize },
    Invalid { peer: usize },
}

impl std::fmt::Display for PeerMiss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let join = |m: &[LabelMiss]| m.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
        match self {
            PeerMiss::NotAPod { peer, ip } => write!(
                f,
                "peer {peer} selects pods and {} is not a pod",
                ip.map(|i| i.to_string()).unwrap_or_else(|| "the endpoint".into())
            ),
            PeerMiss::OtherNamespace { peer, expected, actual } => write!(
                f,
                "peer {peer} has no namespaceSelector, so it selects pods in {expected} only; the pod is in {actual}"
            ),
            PeerMiss::NamespaceLabels { peer, namespace, misses } => {
                write!(f, "peer {peer}: namespace {namespace} {}", join(misses))
            }
            PeerMiss::PodLabels { peer, pod, misses } => {
                write!(f, "peer {peer}: pod {pod} {}", join(misses))
            }
            PeerMiss::OutsideCidr { peer, ip, cidr } => {
                write!(f, "peer {peer}: {ip} is outside ipBlock {cidr}")
            }
            PeerMiss::Excepted { peer, ip, except } => {
                write!(f, "peer {peer}: {ip} is in the ipBlock's except {except}")
            }
            PeerMiss::NoAddress { peer } => {
                write!(f, "peer {peer} is an ipBlock and the pod has no IP")
            }
            PeerMiss::Invalid { peer } => write!(f, "peer {peer} is invalid and matches nothing"),
        }
    }
}
