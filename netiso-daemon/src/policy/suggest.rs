//! The smallest NetworkPolicy that would allow exactly one denied flow, checked with the engine
//! before it is offered.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::engine::{Direction, Endpoint, EngineError, NAMESPACE_NAME_LABEL, PolicyEngine, Verdict};
use super::explain::{Explanation, Suggestion};
use super::model::Flow;
use super::model::{Labels, PodInfo, Protocol};

/// Labels that differ between replicas or revisions of one workload: selecting on them would
/// break at the next rollout.
const UNSTABLE_LABELS: &[&str] = &[
    "pod-template-hash",
    "controller-revision-hash",
    "pod-template-generation",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "controller-uid",
    "batch.kubernetes.io/controller-uid",
    "batch.kubernetes.io/job-completion-index",
];

pub fn stable_labels(labels: &Labels) -> Labels {
    labels.iter().filter(|(k, _)| !UNSTABLE_LABELS.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// A short name for the workload a pod belongs to, from its well-known labels.
pub fn workload_name(pod: &PodInfo) -> String {
    ["app.kubernetes.io/name", "app", "k8s-app", "name"]
        .iter()
        .find_map(|k| pod.labels.get(*k).cloned())
        .unwrap_or_else(|| pod.name.clone())
}

/// Lowercase alphanumerics and '-', at most `max` characters, no leading or trailing '-'.
pub fn dns_label(text: &str, max: usize) -> String {
    let mut out = String::new();
    for c in text.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.truncate(max);
    out.trim_matches('-').to_owned()
}

fn selector(labels: Labels) -> LabelSelector {
    LabelSelector { match_labels: (!labels.is_empty()).then_some(labels), match_expressions: None }
}

fn port_of(port: u16, protocol: Protocol) -> NetworkPolicyPort {
    NetworkPolicyPort {
        port: Some(IntOrString::Int(port.into())),
        end_port: None,
        protocol: Some(protocol.as_str().into()),
    }
}

/// The peer that names `endpoint` as seen from a policy in `policy_namespace`.
fn peer_for(
    engine: &PolicyEngine,
    endpoint: Endpoint,
    policy_namespace: &str,
    notes: &mut Vec<String>,
) -> NetworkPolicyPeer {
    match engine.pod(endpoint) {
        Some(pod) => {
            let labels = stable_labels(&pod.labels);
            if labels.is_empty() {
                notes.push(format!(
                    "{} has no stable labels: the peer selects every pod in namespace {}",
                    pod.key(),
                    pod.namespace
                ));
            }
            let namespace_selector = (pod.namespace != policy_namespace)
                .then(|| selector(BTreeMap::from([(NAMESPACE_NAME_LABEL.to_owned(), pod.namespace.clone())])));
            NetworkPolicyPeer { pod_selector: Some(selector(labels)), namespace_selector, ip_block: None }
        }
        None => {
            let ip = match endpoint {
                Endpoint::Ip(ip) => ip,
                Endpoint::Pod { .. } => unreachable!("a pod endpoint always resolves to a pod"),
            };
            let prefix = if ip.is_ipv4() { 32 } else { 128 };
            NetworkPolicyPeer {
                ip_block: Some(IPBlock { cidr: format!("{ip}/{prefix}"), except: None }),
                ..Default::default()
            }
        }
    }
}

fn end_name(engine: &PolicyEngine, endpoint: Endpoint) -> String {
    match (engine.pod(endpoint), endpoint) {
        (Some(pod), _) => workload_name(pod),
        (None, Endpoint::Ip(ip)) => format!("ip-{ip}"),
        (None, Endpoint::Pod { .. }) => "pod".into(),
    }
}

/// The engine's explanation of `flow` and, when it is denied, the minimal policies that would
/// allow exactly it: for responders (evidence, `netiso explain`), not for bulk replays.
pub fn explain_with_suggestion(engine: &PolicyEngine, flow: &Flow) -> Result<Explanation, EngineError> {
    let mut explanation = engine.explain(flow)?;
    if explanation.verdict == Verdict::Denied {
        let (from, to) = (engine.resolve(&flow.from)?, engine.resolve(&flow.to)?);
        explanation.suggestion = Some(suggest(engine, &explanation, from, to));
    }
    Ok(explanation)
}

fn suggest(engine: &PolicyEngine, explanation: &Explanation, from: Endpoint, to: Endpoint) -> Suggestion {
    let port = explanation.flow.port;
    let protocol = explanation.flow.protocol;
    let mut notes = Vec::new();
    let mut policies = Vec::new();
    let mut verified = true;
    let base_name = dns_label(
        &format!("allow-{}-to-{}-{}-{port}", end_name(engine, from), end_name(engine, to), protocol.as_str()),
        63,
    );
    for (report, subject, peer, direction) in
        [(&explanation.egress, from, to, Direction::Egress), (&explanation.ingress, to, from, Direction::Ingress)]
    {
        if report.verdict != Verdict::Denied {
            continue;
        }
        let Some(subject_pod) = engine.pod(subject) else {
            continue;
        };
        let namespace = subject_pod.namespace.clone();
        let subject_labels = stable_labels(&subject_pod.labels);
        if subject_labels.is_empty() {
            notes.push(format!(
                "{} has no stable labels: the policy selects every pod in namespace {namespace}",
                subject_pod.key()
            ));
        }
        let peer = peer_for(engine, peer, &namespace, &mut notes);
        let ports = Some(vec![port_of(port, protocol)]);
        let (ingress, egress) = match direction {
            Direction::Ingress => (Some(vec![NetworkPolicyIngressRule { from: Some(vec![peer]), ports }]), None),
            Direction::Egress => (None, Some(vec![NetworkPolicyEgressRule { to: Some(vec![peer]), ports }])),
        };
        let suffix = match direction {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        };
        let policy = NetworkPolicy {
            metadata: ObjectMeta {
                name: Some(format!("{}-{suffix}", dns_label(&base_name, 63 - suffix.len() - 1))),
                namespace: Some(namespace),
                ..Default::default()
            },
            spec: Some(NetworkPolicySpec {
                pod_selector: Some(selector(subject_labels)),
                policy_types: Some(vec![if direction == Direction::Ingress { "Ingress" } else { "Egress" }.into()]),
                ingress,
                egress,
            }),
        };
        verified &=
            engine.policy_admits(&policy, direction, subject, peer_endpoint(direction, from, to), port, protocol);
        policies.push(policy);
    }
    let yaml =
        policies.iter().map(|p| serde_saphyr::to_string(p).unwrap_or_default()).collect::<Vec<_>>().join("---\n");
    Suggestion { policies, yaml, verified, notes }
}

fn peer_endpoint(direction: Direction, from: Endpoint, to: Endpoint) -> Endpoint {
    match direction {
        Direction::Ingress => from,
        Direction::Egress => to,
    }
}
