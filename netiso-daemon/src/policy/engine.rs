//! The engine: decides a flow with exact NetworkPolicy semantics and explains the decision.
//! Pure: plain data in, verdict and explanation out.

use std::collections::HashMap;
use std::net::IpAddr;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::compile::{
    CompiledPolicy, NamespaceScope, Peer, PolicyError, PolicyRef, PortMatch, PortSpec, Rule, compile,
};
use super::model::{ClusterState, EndpointRef, Flow, Labels, PodInfo, Protocol};
use super::selector::LabelMiss;

/// The label every namespace carries since Kubernetes 1.21 (set by the API server).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum EngineError {
    #[error("no pod {0} in the inventory")]
    UnknownPod(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allowed,
    Denied,
}

/// A resolved flow end: a pod (by index, with the address used) or an address no pod holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Pod { index: u32, ip: Option<IpAddr> },
    Ip(IpAddr),
}

impl Endpoint {
    fn pod_index(self) -> Option<usize> {
        match self {
            Endpoint::Pod { index, .. } => Some(index as usize),
            Endpoint::Ip(_) => None,
        }
    }

    fn ip(self) -> Option<IpAddr> {
        match self {
            Endpoint::Pod { ip, .. } => ip,
            Endpoint::Ip(ip) => Some(ip),
        }
    }
}

/// How one rule fared against a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RuleOutcome {
    /// Index of the first matching peer (`usize::MAX` when the rule admits every peer).
    peer: Option<usize>,
    port: Option<usize>,
}

impl RuleOutcome {
    fn matched(self) -> bool {
        self.peer.is_some() && self.port.is_some()
    }
}

pub struct PolicyEngine {
    namespaces: HashMap<String, Labels>,
    pods: Vec<PodInfo>,
    pod_by_name: HashMap<(String, String), u32>,
    pod_by_ip: HashMap<IpAddr, u32>,
    policies: Vec<CompiledPolicy>,
    /// Per pod: the policies that select it and govern ingress (egress).
    ingress_of: Vec<Vec<u32>>,
    egress_of: Vec<Vec<u32>>,
    errors: Vec<PolicyError>,
}

impl PolicyEngine {
    pub fn new(state: ClusterState) -> Self {
        let mut namespaces: HashMap<String, Labels> = HashMap::new();
        for ns in state.namespaces {
            let mut labels = ns.labels;
            labels.entry(NAMESPACE_NAME_LABEL.into()).or_insert_with(|| ns.name.clone());
            namespaces.insert(ns.name, labels);
        }
        // A pod in a namespace with no object still has the name label the API server would set.
        for pod in &state.pods {
            namespaces
                .entry(pod.namespace.clone())
                .or_insert_with(|| Labels::from([(NAMESPACE_NAME_LABEL.into(), pod.namespace.clone())]));
        }
        let mut pod_by_name = HashMap::new();
        let mut pod_by_ip = HashMap::new();
        for (i, pod) in state.pods.iter().enumerate() {
            pod_by_name.insert((pod.namespace.clone(), pod.name.clone()), i as u32);
            if !pod.host_network {
                for ip in &pod.ips {
                    pod_by_ip.insert(*ip, i as u32);
                }
            }
        }
        let mut errors = Vec::new();
        // Same namespace and name: the later object replaces the earlier, as in the API.
        let mut by_key: HashMap<(String, String), usize> = HashMap::new();
        let mut policies: Vec<CompiledPolicy> = Vec::new();
        for p in &state.policies {
            if let Some(c) = compile(p, &mut errors) {
                let key = (c.reference.namespace.clone(), c.reference.name.clone());
                match by_key.get(&key) {
                    Some(&i) => policies[i] = c,
                    None => {
                        by_key.insert(key, policies.len());
                        policies.push(c);
                    }
                }
            }
        }
        let mut pods_by_namespace: HashMap<&str, Vec<u32>> = HashMap::new();
        for (i, pod) in state.pods.iter().enumerate() {
            if !pod.host_network {
                pods_by_namespace.entry(pod.namespace.as_str()).or_default().push(i as u32);
            }
        }
        let mut ingress_of = vec![Vec::new(); state.pods.len()];
        let mut egress_of = vec![Vec::new(); state.pods.len()];
        for (pi, policy) in policies.iter().enumerate() {
            for &pod in pods_by_namespace.get(policy.namespace()).into_iter().flatten() {
                if policy.pod_selector.matches(&state.pods[pod as usize].labels) {
                    if policy.ingress.is_some() {
                        ingress_of[pod as usize].push(pi as u32);
                    }
                    if policy.egress.is_some() {
                        egress_of[pod as usize].push(pi as u32);
                    }
                }
            }
        }
        PolicyEngine { namespaces, pods: state.pods, pod_by_name, pod_by_ip, policies, ingress_of, egress_of, errors }
    }

    /// Validation problems found while compiling the policies.
    pub fn errors(&self) -> &[PolicyError] {
        &self.errors
    }

    pub fn policies(&self) -> &[CompiledPolicy] {
        &self.policies
    }

    pub fn pods(&self) -> &[PodInfo] {
        &self.pods
    }

    pub fn pod(&self, endpoint: Endpoint) -> Option<&PodInfo> {
        endpoint.pod_index().map(|i| &self.pods[i])
    }

    pub fn namespace_labels(&self, namespace: &str) -> Option<&Labels> {
        self.namespaces.get(namespace)
    }

    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&PodInfo> {
        self.pod_by_ip.get(&ip).map(|&i| &self.pods[i as usize])
    }

    /// Resolves a named end. An address held by a pod is that pod; a host-network pod is its IP.
    pub fn resolve(&self, endpoint: &EndpointRef) -> Result<Endpoint, EngineError> {
        match endpoint {
            EndpointRef::Ip(ip) => Ok(match self.pod_by_ip.get(ip) {
                Some(&index) => Endpoint::Pod { index, ip: Some(*ip) },
                None => Endpoint::Ip(*ip),
            }),
            EndpointRef::Pod { namespace, name, ip } => {
                let &index = self
                    .pod_by_name
                    .get(&(namespace.clone(), name.clone()))
                    .ok_or_else(|| EngineError::UnknownPod(format!("{namespace}/{name}")))?;
                let pod = &self.pods[index as usize];
                let ip = ip.or_else(|| pod.ips.first().copied());
                if pod.host_network {
                    return ip
                        .map(Endpoint::Ip)
                        .ok_or_else(|| EngineError::UnknownPod(format!("{namespace}/{name} (host network, no IP)")));
                }
                Ok(Endpoint::Pod { index, ip })
            }
        }
    }

    /// The verdict alone: the fast path.
    pub fn allows(&self, from: Endpoint, to: Endpoint, port: u16, protocol: Protocol) -> bool {
        self.direction_allows(Direction::Egress, from, to, port, protocol)
            && self.direction_allows(Direction::Ingress, to, from, port, protocol)
    }

    pub fn verdict(&self, flow: &Flow) -> Result<Verdict, EngineError> {
        let (from, to) = (self.resolve(&flow.from)?, self.resolve(&flow.to)?);
        Ok(if self.allows(from, to, flow.port, flow.protocol) { Verdict::Allowed } else { Verdict::Denied })
    }

    fn governing(&self, direction: Direction, subject: usize) -> &[u32] {
        match direction {
            Direction::Ingress => &self.ingress_of[subject],
            Direction::Egress => &self.egress_of[subject],
        }
    }

    fn direction_allows(
        &self,
        direction: Direction,
        subject: Endpoint,
        peer: Endpoint,
        port: u16,
        protocol: Protocol,
    ) -> bool {
        let Some(subject) = subject.pod_index() else {
            return true;
        };
        let governing = self.governing(direction, subject);
        governing.is_empty()
            || governing.iter().any(|&p| {
                let policy = &self.policies[p as usize];
                rules(policy, direction)
                    .iter()
                    .any(|rule| self.rule_outcome(policy, rule, direction, subject, peer, port, protocol).matched())
            })
    }

    #[allow(clippy::too_many_arguments)]
    fn rule_outcome(
        &self,
        policy: &CompiledPolicy,
        rule: &Rule,
        direction: Direction,
        subject: usize,
        peer: Endpoint,
        port: u16,
        protocol: Protocol,
    ) -> RuleOutcome {
        let peer_match = match &rule.peers {
            None => Some(usize::MAX),
            Some(peers) => peers.iter().position(|p| self.peer_matches(policy, p, peer)),
        };
        // Named ports resolve against the destination pod: the subject for ingress, the peer for egress.
        let destination = match direction {
            Direction::Ingress => Some(&self.pods[subject]),
            Direction::Egress => peer.pod_index().map(|i| &self.pods[i]),
        };
        let port_match = match &rule.ports {
            None => Some(usize::MAX),
            Some(ports) => ports.iter().position(|p| port_matches(p, port, protocol, destination)),
        };
        RuleOutcome { peer: peer_match, port: port_match }
    }

    fn peer_matches(&self, policy: &CompiledPolicy, peer: &Peer, endpoint: Endpoint) -> bool {
        match peer {
            Peer::Pods { namespaces, pods } => {
                let Some(index) = endpoint.pod_index() else {
                    return false;
                };
                let pod = &self.pods[index];
                let namespace_ok = match namespaces {
                    NamespaceScope::PolicyNamespace => pod.namespace == policy.namespace(),
                    NamespaceScope::Selector(s) => self.namespaces.get(&pod.namespace).is_some_and(|l| s.matches(l)),
                };
                namespace_ok && pods.matches(&pod.labels)
            }
            Peer::IpBlock { cidr, except } => {
                endpoint.ip().is_some_and(|ip| cidr.contains(&ip) && !except.iter().any(|e| e.contains(&ip)))
            }
            Peer::Invalid => false,
        }
    }

    /// Whether `policy`, were it added, would select `subject` for `direction` and admit the flow.
    pub fn policy_admits(
        &self,
        policy: &NetworkPolicy,
        direction: Direction,
        subject: Endpoint,
        peer: Endpoint,
        port: u16,
        protocol: Protocol,
    ) -> bool {
        let mut errors = Vec::new();
        let Some(compiled) = compile(policy, &mut errors) else {
            return false;
        };
        let Some(index) = subject.pod_index() else {
            return false;
        };
        let pod = &self.pods[index];
        compiled.namespace() == pod.namespace
            && compiled.pod_selector.matches(&pod.labels)
            && rules(&compiled, direction)
                .iter()
                .any(|rule| self.rule_outcome(&compiled, rule, direction, index, peer, port, protocol).matched())
    }

    /// What the policies governing `subject` in `direction` admit, with selectors resolved to
    /// the pods they select and named ports to numbers: the input of an enforcement compiler.
    /// `None` when no policy isolates the subject (everything is admitted); an empty list denies all.
    pub fn clauses(&self, direction: Direction, subject: Endpoint) -> Option<Vec<Clause>> {
        let subject = subject.pod_index()?;
        let governing = self.governing(direction, subject);
        if governing.is_empty() {
            return None;
        }
        let mut clauses = Vec::new();
        for &p in governing {
            let policy = &self.policies[p as usize];
            for rule in rules(policy, direction) {
                let peers: Vec<ClausePeer> = match &rule.peers {
                    None => vec![ClausePeer::Any],
                    Some(peers) => peers
                        .iter()
                        .flat_map(|peer| match peer {
                            Peer::Pods { .. } => (0..self.pods.len() as u32)
                                .filter(|&q| {
                                    !self.pods[q as usize].host_network
                                        && self.peer_matches(policy, peer, Endpoint::Pod { index: q, ip: None })
                                })
                                .map(ClausePeer::Pod)
                                .collect::<Vec<_>>(),
                            Peer::IpBlock { cidr, except } => {
                                vec![ClausePeer::Block { cidr: *cidr, except: except.clone() }]
                            }
                            Peer::Invalid => vec![],
                        })
                        .collect(),
                };
                for peer in peers {
                    let Some(specs) = &rule.ports else {
                        clauses.push(Clause { peer: peer.clone(), port: None });
                        continue;
                    };
                    for spec in specs {
                        match &spec.port {
                            PortMatch::Any => clauses.push(Clause {
                                peer: peer.clone(),
                                port: Some(ClausePort { protocol: spec.protocol, range: None }),
                            }),
                            PortMatch::Range(lo, hi) => clauses.push(Clause {
                                peer: peer.clone(),
                                port: Some(ClausePort { protocol: spec.protocol, range: Some((*lo, *hi)) }),
                            }),
                            PortMatch::Named(name) => {
                                // The destination pod decides what the name means.
                                let destinations: Vec<(ClausePeer, u32)> = match (direction, &peer) {
                                    (Direction::Ingress, _) => vec![(peer.clone(), subject as u32)],
                                    (Direction::Egress, ClausePeer::Pod(q)) => {
                                        vec![(peer.clone(), *q)]
                                    }
                                    (Direction::Egress, ClausePeer::Any) => (0..self.pods.len() as u32)
                                        .filter(|&q| !self.pods[q as usize].host_network)
                                        .map(|q| (ClausePeer::Pod(q), q))
                                        .collect(),
                                    (Direction::Egress, ClausePeer::Block { .. }) => vec![],
                                };
                                for (peer, destination) in destinations {
                                    for cp in &self.pods[destination as usize].ports {
                                        if cp.name.as_deref() == Some(name) && cp.protocol == spec.protocol {
                                            clauses.push(Clause {
                                                peer: peer.clone(),
                                                port: Some(ClausePort {
                                                    protocol: spec.protocol,
                                                    range: Some((cp.port, cp.port)),
                                                }),
                                            });
                                        }
                                    }
                                }
                            }
                            PortMatch::Invalid => {}
                        }
                    }
                }
            }
        }
        Some(clauses)
    }

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
                summary: format!("no NetworkPolicy selects {} for {dir}: {dir} is not isolated", subject_pod.key()),
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

fn rules(policy: &CompiledPolicy, direction: Direction) -> &[Rule] {
    match direction {
        Direction::Ingress => policy.ingress.as_deref().unwrap_or_default(),
        Direction::Egress => policy.egress.as_deref().unwrap_or_default(),
    }
}

fn port_matches(spec: &PortSpec, port: u16, protocol: Protocol, destination: Option<&PodInfo>) -> bool {
    if spec.protocol != protocol {
        return false;
    }
    match &spec.port {
        PortMatch::Any => true,
        PortMatch::Range(lo, hi) => (*lo..=*hi).contains(&port),
        PortMatch::Named(name) => destination.is_some_and(|pod| {
            pod.ports.iter().any(|cp| cp.name.as_deref() == Some(name) && cp.protocol == protocol && cp.port == port)
        }),
        PortMatch::Invalid => false,
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

/// The other end of a [`Clause`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClausePeer {
    Any,
    Pod(u32),
    Block { cidr: ipnet::IpNet, except: Vec<ipnet::IpNet> },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClausePort {
    pub protocol: Protocol,
    /// Inclusive; `None` is every port of the protocol.
    pub range: Option<(u16, u16)>,
}

/// One admitted (peer, port) combination. `port: None` admits every port of every protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Clause {
    pub peer: ClausePeer,
    pub port: Option<ClausePort>,
}
