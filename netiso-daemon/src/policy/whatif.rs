//! What-if and advice over recorded traffic. Pure: the cluster as it is, the flows recorded, and
//! the proposed policies in; a report out.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Serialize};

use super::compile::{PolicyError, PolicyRef};
use super::engine::{NAMESPACE_NAME_LABEL, PolicyEngine, Verdict};
use super::model::ClusterState;
use super::model::{Flow, Labels, PodInfo, Protocol};
use super::suggest::{dns_label, stable_labels};
use crate::cluster::{EndpointKind, Identity};

/// `namespace/workload`, `namespace/pod`, or the address.
fn group_name(end: &Identity) -> String {
    match (&end.namespace, &end.workload, &end.pod) {
        (Some(ns), Some(w), _) => format!("{ns}/{w}"),
        (Some(ns), None, Some(p)) => format!("{ns}/{p}"),
        _ => end.ip.to_string(),
    }
}

/// A recorded flow (not a reply), ready to be decided again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedFlow {
    pub source: Identity,
    pub destination: Identity,
    pub port: u16,
    pub protocol: Protocol,
    /// `forwarded` or `dropped`, as recorded.
    pub recorded: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FlowGroup {
    pub source: String,
    pub destination: String,
    pub port: u16,
    pub protocol: Protocol,
    /// Recorded flows in the group.
    pub flows: usize,
    /// Newly denied: the proposed policies that isolate the denying side. Newly allowed: the
    /// proposed policies that admit it.
    pub policies: Vec<PolicyRef>,
    /// Newly denied: why the closest proposed rule does not admit it.
    pub nearest_miss: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WhatIfReport {
    pub evaluated: usize,
    pub newly_denied: Vec<FlowGroup>,
    pub newly_allowed: Vec<FlowGroup>,
    pub unchanged: usize,
    /// Problems in the proposed policies (they are evaluated as far as possible).
    pub proposed_errors: Vec<PolicyError>,
}

/// Adds pods the records name that are gone from the current state, as the records saw them.
fn with_recorded_pods(current: &ClusterState, flows: &[RecordedFlow]) -> ClusterState {
    let mut state = current.clone();
    for f in flows {
        for end in [&f.source, &f.destination] {
            if let (Some(ns), Some(name)) = (&end.namespace, &end.pod)
                && !state.pods.iter().any(|p| &p.namespace == ns && &p.name == name)
            {
                state.pods.push(PodInfo {
                    namespace: ns.clone(),
                    name: name.clone(),
                    labels: end.labels.clone().unwrap_or_default(),
                    ips: vec![end.ip],
                    ports: vec![],
                    host_network: false,
                    node: end.node.clone(),
                });
            }
        }
    }
    state
}

/// The proposed policies added to those in force; one with the same namespace and name replaces
/// the one in force.
pub fn apply_proposed(current: &[NetworkPolicy], proposed: &[NetworkPolicy]) -> Vec<NetworkPolicy> {
    let key = |p: &NetworkPolicy| {
        (p.metadata.namespace.clone().unwrap_or_else(|| "default".into()), p.metadata.name.clone().unwrap_or_default())
    };
    let replaced: BTreeSet<(String, String)> = proposed.iter().map(key).collect();
    current.iter().filter(|p| !replaced.contains(&key(p))).cloned().chain(proposed.iter().cloned()).collect()
}

fn is_proposed(r: &PolicyRef, proposed: &[NetworkPolicy]) -> bool {
    proposed
        .iter()
        .any(|p| p.metadata.namespace.as_deref() == Some(&r.namespace) && p.metadata.name.as_deref() == Some(&r.name))
}

/// Decides every recorded flow under the policies in force and under the proposal, and reports
/// what changes.
pub fn replay(current: &ClusterState, proposed: &[NetworkPolicy], flows: &[RecordedFlow]) -> WhatIfReport {
    let before_state = with_recorded_pods(current, flows);
    let mut after_state = before_state.clone();
    after_state.policies = apply_proposed(&before_state.policies, proposed);
    let before = PolicyEngine::new(before_state);
    let after = PolicyEngine::new(after_state);
    let proposed_errors: Vec<PolicyError> = after
        .errors()
        .iter()
        .filter(|e| {
            proposed.iter().any(|p| {
                e.policy
                    == format!(
                        "{}/{}",
                        p.metadata.namespace.as_deref().unwrap_or("default"),
                        p.metadata.name.as_deref().unwrap_or("")
                    )
            })
        })
        .cloned()
        .collect();

    type Key = (String, String, u16, Protocol);
    let mut denied: BTreeMap<Key, FlowGroup> = BTreeMap::new();
    let mut allowed: BTreeMap<Key, FlowGroup> = BTreeMap::new();
    let mut unchanged = 0;
    let mut evaluated = 0;
    for f in flows {
        let flow = Flow { from: (&f.source).into(), to: (&f.destination).into(), port: f.port, protocol: f.protocol };
        let (Ok(was), Ok(now)) = (before.explain(&flow), after.explain(&flow)) else { continue };
        evaluated += 1;
        let key = (group_name(&f.source), group_name(&f.destination), f.port, f.protocol);
        let group = |policies: Vec<PolicyRef>, nearest_miss: Option<String>| FlowGroup {
            source: key.0.clone(),
            destination: key.1.clone(),
            port: key.2,
            protocol: key.3,
            flows: 0,
            policies,
            nearest_miss,
        };
        match (was.verdict, now.verdict) {
            (Verdict::Allowed, Verdict::Denied) => {
                let sides: Vec<_> =
                    [&now.egress, &now.ingress].into_iter().filter(|d| d.verdict == Verdict::Denied).collect();
                let mut policies: Vec<PolicyRef> = sides
                    .iter()
                    .flat_map(|d| d.isolating_policies.iter())
                    .filter(|r| is_proposed(r, proposed))
                    .cloned()
                    .collect();
                policies.dedup();
                let miss = sides
                    .iter()
                    .flat_map(|d| d.nearest_misses.iter())
                    .find(|m| is_proposed(&m.policy, proposed))
                    .map(|m| m.summary.clone());
                denied.entry(key.clone()).or_insert_with(|| group(policies, miss)).flows += 1;
            }
            (Verdict::Denied, Verdict::Allowed) => {
                let mut policies: Vec<PolicyRef> = [&now.egress, &now.ingress]
                    .iter()
                    .flat_map(|d| d.allowed_by.iter().map(|r| r.policy.clone()))
                    .filter(|r| is_proposed(r, proposed))
                    .collect();
                policies.dedup();
                allowed.entry(key.clone()).or_insert_with(|| group(policies, None)).flows += 1;
            }
            _ => unchanged += 1,
        }
    }
    WhatIfReport {
        evaluated,
        newly_denied: denied.into_values().collect(),
        newly_allowed: allowed.into_values().collect(),
        unchanged,
        proposed_errors,
    }
}

/// A default deny of ingress and egress for `namespace`.
pub fn default_deny(namespace: &str) -> NetworkPolicy {
    NetworkPolicy {
        metadata: ObjectMeta {
            name: Some("default-deny-all".into()),
            namespace: Some(namespace.into()),
            ..Default::default()
        },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector::default()),
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
            ..Default::default()
        }),
    }
}

fn selector(labels: Labels) -> LabelSelector {
    LabelSelector { match_labels: (!labels.is_empty()).then_some(labels), match_expressions: None }
}

/// How advice names a peer: a pod group by namespace and stable labels, or an address.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum PeerKey {
    Pods { namespace: String, labels: Labels },
    Address(IpAddr),
}

fn peer_key(end: &Identity, dns: &Labels) -> PeerKey {
    match (&end.namespace, &end.pod, &end.labels) {
        (Some(ns), Some(_), Some(labels)) => {
            let stable = stable_labels(labels);
            // DNS is selected the way the kube-dns Service selects its pods.
            let labels = if !dns.is_empty() && ns == "kube-system" && dns.iter().all(|(k, v)| labels.get(k) == Some(v))
            {
                dns.clone()
            } else {
                stable
            };
            PeerKey::Pods { namespace: ns.clone(), labels }
        }
        _ => PeerKey::Address(end.ip),
    }
}

fn peer(key: &PeerKey, policy_namespace: &str) -> NetworkPolicyPeer {
    match key {
        PeerKey::Pods { namespace, labels } => NetworkPolicyPeer {
            pod_selector: Some(selector(labels.clone())),
            namespace_selector: (namespace != policy_namespace)
                .then(|| selector(BTreeMap::from([(NAMESPACE_NAME_LABEL.to_owned(), namespace.clone())]))),
            ip_block: None,
        },
        PeerKey::Address(ip) => NetworkPolicyPeer {
            ip_block: Some(k8s_openapi::api::networking::v1::IPBlock {
                cidr: format!("{ip}/{}", if ip.is_ipv4() { 32 } else { 128 }),
                except: None,
            }),
            ..Default::default()
        },
    }
}

fn ports(set: &BTreeSet<(Protocol, u16)>) -> Vec<NetworkPolicyPort> {
    set.iter()
        .map(|(protocol, port)| NetworkPolicyPort {
            protocol: Some(protocol.as_str().into()),
            port: Some(IntOrString::Int((*port).into())),
            end_port: None,
        })
        .collect()
}

fn subject_name(labels: &Labels) -> String {
    ["app.kubernetes.io/name", "app", "k8s-app", "name"]
        .iter()
        .find_map(|k| labels.get(*k).cloned())
        .unwrap_or_else(|| "all".into())
}

/// The smallest allow policies that keep every recorded forwarded flow of `namespace`'s pods
/// working under a default deny: one ingress and one egress policy per workload (selected by
/// its stable labels), one rule per peer with the ports observed. `dns` is the kube-dns
/// Service's selector.
pub fn advise(namespace: &str, flows: &[RecordedFlow], dns: &Labels) -> Vec<NetworkPolicy> {
    type Rules = BTreeMap<PeerKey, BTreeSet<(Protocol, u16)>>;
    let mut ingress: BTreeMap<Labels, Rules> = BTreeMap::new();
    let mut egress: BTreeMap<Labels, Rules> = BTreeMap::new();
    // Traffic between a pod and its own node is always allowed: no rule is needed for it.
    let own_node = |pod: &Identity, peer: &Identity| {
        peer.kind == EndpointKind::Node && pod.node.is_some() && peer.node == pod.node
    };
    for f in flows.iter().filter(|f| {
        f.recorded == "forwarded" && !own_node(&f.destination, &f.source) && !own_node(&f.source, &f.destination)
    }) {
        if f.destination.namespace.as_deref() == Some(namespace) && f.destination.pod.is_some() {
            let subject = stable_labels(f.destination.labels.as_ref().unwrap_or(&Labels::new()));
            ingress
                .entry(subject)
                .or_default()
                .entry(peer_key(&f.source, dns))
                .or_default()
                .insert((f.protocol, f.port));
        }
        if f.source.namespace.as_deref() == Some(namespace) && f.source.pod.is_some() {
            let subject = stable_labels(f.source.labels.as_ref().unwrap_or(&Labels::new()));
            egress
                .entry(subject)
                .or_default()
                .entry(peer_key(&f.destination, dns))
                .or_default()
                .insert((f.protocol, f.port));
        }
    }
    let mut out = Vec::new();
    for (subject, rules) in ingress {
        out.push(NetworkPolicy {
            metadata: ObjectMeta {
                name: Some(dns_label(&format!("allow-ingress-{}", subject_name(&subject)), 63)),
                namespace: Some(namespace.into()),
                ..Default::default()
            },
            spec: Some(NetworkPolicySpec {
                pod_selector: Some(selector(subject)),
                policy_types: Some(vec!["Ingress".into()]),
                ingress: Some(
                    rules
                        .iter()
                        .map(|(p, set)| NetworkPolicyIngressRule {
                            from: Some(vec![peer(p, namespace)]),
                            ports: Some(ports(set)),
                        })
                        .collect(),
                ),
                egress: None,
            }),
        });
    }
    for (subject, rules) in egress {
        out.push(NetworkPolicy {
            metadata: ObjectMeta {
                name: Some(dns_label(&format!("allow-egress-{}", subject_name(&subject)), 63)),
                namespace: Some(namespace.into()),
                ..Default::default()
            },
            spec: Some(NetworkPolicySpec {
                pod_selector: Some(selector(subject)),
                policy_types: Some(vec!["Egress".into()]),
                egress: Some(
                    rules
                        .iter()
                        .map(|(p, set)| NetworkPolicyEgressRule {
                            to: Some(vec![peer(p, namespace)]),
                            ports: Some(ports(set)),
                        })
                        .collect(),
                ),
                ingress: None,
            }),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::NodeInfo;
    use crate::policy::NamespaceInfo;

    fn end(ns: &str, pod: &str, labels: &[(&str, &str)], ip: &str) -> Identity {
        Identity {
            kind: EndpointKind::Pod,
            namespace: Some(ns.into()),
            pod: Some(pod.into()),
            workload: Some(format!("Deployment/{pod}")),
            labels: Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            node: None,
            service: None,
            ip: ip.parse().unwrap(),
            port: 0,
        }
    }

    fn flow(from: Identity, to: Identity, port: u16, protocol: Protocol) -> RecordedFlow {
        RecordedFlow { source: from, destination: to, port, protocol, recorded: "forwarded".into() }
    }

    fn state() -> ClusterState {
        let ns = |n: &str| NamespaceInfo { name: n.into(), labels: Labels::new() };
        ClusterState { namespaces: vec![ns("prod"), ns("web"), ns("kube-system")], ..Default::default() }
    }

    fn traffic() -> Vec<RecordedFlow> {
        let api = end("prod", "api", &[("app", "api"), ("pod-template-hash", "abc")], "10.0.0.1");
        let front = end("web", "front", &[("app", "front")], "10.0.0.2");
        let dns = end("kube-system", "coredns", &[("k8s-app", "kube-dns"), ("pod-template-hash", "x")], "10.0.0.53");
        vec![
            flow(front.clone(), api.clone(), 8080, Protocol::Tcp),
            flow(front.clone(), api.clone(), 8080, Protocol::Tcp),
            flow(api.clone(), dns.clone(), 53, Protocol::Udp),
            flow(api.clone(), dns, 53, Protocol::Tcp),
        ]
    }

    #[test]
    fn a_default_deny_reports_what_breaks_grouped_and_attributed() {
        let report = replay(&state(), &[default_deny("prod")], &traffic());
        assert_eq!(report.evaluated, 4);
        assert_eq!(report.newly_denied.len(), 3);
        let ingress =
            report.newly_denied.iter().find(|g| g.destination == "prod/Deployment/api" && g.port == 8080).unwrap();
        assert_eq!(ingress.flows, 2, "grouped by workload, port and protocol");
        assert_eq!(ingress.policies[0].name, "default-deny-all");
        assert!(ingress.nearest_miss.as_deref().unwrap().contains("default deny"));
        assert!(report.newly_allowed.is_empty());
    }

    #[test]
    fn a_proposed_policy_replaces_one_in_force_by_name() {
        let mut current = state();
        current.policies.push(default_deny("prod"));
        let mut allow_all = default_deny("prod");
        allow_all.spec.as_mut().unwrap().ingress = Some(vec![NetworkPolicyIngressRule::default()]);
        allow_all.spec.as_mut().unwrap().egress = Some(vec![NetworkPolicyEgressRule::default()]);
        let report = replay(&current, &[allow_all], &traffic());
        assert!(report.newly_denied.is_empty());
        assert_eq!(report.newly_allowed.iter().map(|g| g.flows).sum::<usize>(), 4);
        assert_eq!(report.newly_allowed[0].policies[0].name, "default-deny-all", "the replacement admits them");
    }

    #[test]
    fn an_empty_window_changes_nothing() {
        let report = replay(&state(), &[default_deny("prod")], &[]);
        assert_eq!((report.evaluated, report.newly_denied.len(), report.unchanged), (0, 0, 0));
    }

    #[test]
    fn advice_keeps_every_recorded_flow_under_default_deny() {
        let flows = traffic();
        let dns = Labels::from([("k8s-app".to_owned(), "kube-dns".to_owned())]);
        let advice = advise("prod", &flows, &dns);
        let yaml: String = advice.iter().map(|p| serde_saphyr::to_string(p).unwrap()).collect();
        assert!(!yaml.contains("pod-template-hash"), "{yaml}");
        assert!(yaml.contains("k8s-app: kube-dns"), "DNS by the kube-dns Service's selector: {yaml}");
        assert!(yaml.contains("kubernetes.io/metadata.name: web"), "{yaml}");
        let mut proposed = vec![default_deny("prod")];
        proposed.extend(advice);
        let report = replay(&state(), &proposed, &flows);
        assert!(report.newly_denied.is_empty(), "{:#?}", report.newly_denied);
        // Anything not recorded stays denied.
        let stranger = flow(
            end("web", "other", &[("app", "other")], "10.0.0.9"),
            end("prod", "api", &[("app", "api")], "10.0.0.1"),
            8080,
            Protocol::Tcp,
        );
        let report = replay(&state(), &proposed, &[stranger]);
        assert_eq!(report.newly_denied.len(), 1);
    }

    #[test]
    fn the_kubelets_probes_neither_break_under_default_deny_nor_need_advice() {
        let mut api = end("prod", "api", &[("app", "api")], "10.0.0.1");
        api.node = Some("n1".into());
        let kubelet = Identity {
            kind: EndpointKind::Node,
            node: Some("n1".into()),
            ..Identity::world("192.168.1.1".parse().unwrap(), 0)
        };
        let other_node = Identity { node: Some("n2".into()), ..Identity::world("192.168.1.2".parse().unwrap(), 0) };
        let other_node = Identity { kind: EndpointKind::Node, ..other_node };
        let probes = vec![flow(kubelet, api.clone(), 8080, Protocol::Tcp), flow(other_node, api, 8080, Protocol::Tcp)];
        let mut current = state();
        current.nodes = vec![
            NodeInfo { name: "n1".into(), addresses: vec!["192.168.1.1".parse().unwrap()] },
            NodeInfo { name: "n2".into(), addresses: vec!["192.168.1.2".parse().unwrap()] },
        ];
        let report = replay(&current, &[default_deny("prod")], &probes);
        let denied: Vec<&str> = report.newly_denied.iter().map(|g| g.source.as_str()).collect();
        assert_eq!(denied, ["192.168.1.2"], "only the other node is cut off");
        let yaml: String =
            advise("prod", &probes, &Labels::new()).iter().map(|p| serde_saphyr::to_string(p).unwrap()).collect();
        assert!(!yaml.contains("192.168.1.1"), "no rule for the pod's own node: {yaml}");
        assert!(yaml.contains("192.168.1.2/32"), "{yaml}");
    }
}
