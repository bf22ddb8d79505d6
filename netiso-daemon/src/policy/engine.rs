//! The engine: indexes the cluster's policies and decides a flow with exact NetworkPolicy
//! semantics. Pure: plain data in, verdict out. Its explanations are in `explain`, what it
//! compiles for an enforcer in `clauses`.

use std::collections::HashMap;
use std::net::IpAddr;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::compile::{CompiledPolicy, NamespaceScope, Peer, PolicyError, PortMatch, PortSpec, Rule, compile};
use super::model::{ClusterState, EndpointRef, Flow, Labels, PodInfo, Protocol};

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
    pub(super) fn pod_index(self) -> Option<usize> {
        match self {
            Endpoint::Pod { index, .. } => Some(index as usize),
            Endpoint::Ip(_) => None,
        }
    }

    pub(super) fn ip(self) -> Option<IpAddr> {
        match self {
            Endpoint::Pod { ip, .. } => ip,
            Endpoint::Ip(ip) => Some(ip),
        }
    }
}

/// How one rule fared against a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct RuleOutcome {
    /// Index of the first matching peer (`usize::MAX` when the rule admits every peer).
    pub(super) peer: Option<usize>,
    pub(super) port: Option<usize>,
}

impl RuleOutcome {
    pub(super) fn matched(self) -> bool {
        self.peer.is_some() && self.port.is_some()
    }
}

pub struct PolicyEngine {
    pub(super) namespaces: HashMap<String, Labels>,
    pub(super) pods: Vec<PodInfo>,
    pod_by_name: HashMap<(String, String), u32>,
    pod_by_ip: HashMap<IpAddr, u32>,
    /// Each node's own addresses: traffic between a pod and its node is always allowed.
    node_by_ip: HashMap<IpAddr, String>,
    pub(super) policies: Vec<CompiledPolicy>,
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
        let mut node_by_ip = HashMap::new();
        for node in state.nodes {
            for ip in node.addresses {
                node_by_ip.insert(ip, node.name.clone());
            }
        }
        for (i, pod) in state.pods.iter().enumerate() {
            pod_by_name.insert((pod.namespace.clone(), pod.name.clone()), i as u32);
            match (pod.host_network, &pod.node) {
                (false, _) => pod_by_ip.extend(pod.ips.iter().map(|ip| (*ip, i as u32))),
                (true, Some(node)) => node_by_ip.extend(pod.ips.iter().map(|ip| (*ip, node.clone()))),
                (true, None) => {}
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
        PolicyEngine {
            namespaces,
            pods: state.pods,
            pod_by_name,
            pod_by_ip,
            node_by_ip,
            policies,
            ingress_of,
            egress_of,
            errors,
        }
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

    /// The node whose own address `endpoint` is, if any.
    pub fn node_of(&self, endpoint: Endpoint) -> Option<&str> {
        match endpoint {
            Endpoint::Ip(ip) => self.node_by_ip.get(&ip).map(String::as_str),
            Endpoint::Pod { .. } => None,
        }
    }

    /// The node `subject` runs on when `peer` is that node: Kubernetes always allows traffic
    /// between a pod and its own node, whatever the policies say.
    pub(super) fn own_node(&self, subject: usize, peer: Endpoint) -> Option<&str> {
        let node = self.pods[subject].node.as_deref()?;
        (self.node_of(peer) == Some(node)).then_some(node)
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

    /// Whether each side denies a flow (egress, ingress), on the fast path.
    pub fn denied_sides(&self, flow: &Flow) -> Result<(bool, bool), EngineError> {
        let (from, to) = (self.resolve(&flow.from)?, self.resolve(&flow.to)?);
        Ok((
            !self.direction_allows(Direction::Egress, from, to, flow.port, flow.protocol),
            !self.direction_allows(Direction::Ingress, to, from, flow.port, flow.protocol),
        ))
    }

    pub fn verdict(&self, flow: &Flow) -> Result<Verdict, EngineError> {
        let (from, to) = (self.resolve(&flow.from)?, self.resolve(&flow.to)?);
        Ok(if self.allows(from, to, flow.port, flow.protocol) { Verdict::Allowed } else { Verdict::Denied })
    }

    pub(super) fn governing(&self, direction: Direction, subject: usize) -> &[u32] {
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
            || self.own_node(subject, peer).is_some()
            || governing.iter().any(|&p| {
                let policy = &self.policies[p as usize];
                rules(policy, direction)
                    .iter()
                    .any(|rule| self.rule_outcome(policy, rule, direction, subject, peer, port, protocol).matched())
            })
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn rule_outcome(
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

    pub(super) fn peer_matches(&self, policy: &CompiledPolicy, peer: &Peer, endpoint: Endpoint) -> bool {
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
}

pub(super) fn rules(policy: &CompiledPolicy, direction: Direction) -> &[Rule] {
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
