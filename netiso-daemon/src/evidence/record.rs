//! A flow record: what the kernel saw, who was on each end, and what NetworkPolicy says about
//! it. One JSON shape, used by the store, the logs, the API and the CLI.

use std::time::SystemTime;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::{Deserialize, Serialize};

use crate::cluster::Identity;
use crate::datapath::reasons::ReasonClass;
use crate::datapath::record::IpProtocol;
use crate::datapath::{Direction as PacketDirection, EventKind};
use crate::policy::explain::{RuleRef, Suggestion};
use crate::policy::{Direction, Explanation, Labels, PolicyRef, Verdict};

pub mod rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_rfc3339_nanos(*t).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_rfc3339(&text).map_err(serde::de::Error::custom)
    }
}

/// Record ids are numbers too large for JSON's doubles: they travel as strings.
pub mod id_string {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(id: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&id.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowVerdict {
    Dropped,
    Forwarded,
}

impl FlowVerdict {
    pub fn as_str(self) -> &'static str {
        match self {
            FlowVerdict::Dropped => "dropped",
            FlowVerdict::Forwarded => "forwarded",
        }
    }
}

/// What explains the record, stated explicitly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Attribution {
    /// Dropped where NetworkPolicy is enforced, and the policies deny it.
    DeniedByNetworkPolicy,
    /// Dropped by netfilter or tc although NetworkPolicy allows it: another firewall rule.
    DroppedByFirewallRuleNetworkPolicyDoesNotExplain,
    /// Dropped by the kernel for a reason that is not policy (no socket, no route, ...).
    DroppedByKernelForNonPolicyReason,
    /// Forwarded, and NetworkPolicy allows it.
    AllowedByNetworkPolicy,
    /// Forwarded; no policy isolates either end.
    NotIsolated,
    /// Forwarded between a pod and its own node, which NetworkPolicy always allows.
    NodeTraffic,
    /// Forwarded although the policies deny it (not enforced on this path, or not yet).
    ForwardedDespiteNetworkPolicy,
    /// A reply within a connection already admitted.
    Reply,
    /// Dropped on its way to a Service that has no endpoints (kube-proxy rejects it).
    ServiceWithoutEndpoints,
    /// A TCP reset or ICMP error a reject rule sent, answering a packet it dropped: not the
    /// peer's reply (the rejected packet's drop holds the verdict).
    FirewallReply,
    /// NetworkPolicy does not govern this traffic (ICMP, other protocols).
    NotApplicable,
}

impl Attribution {
    /// As in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Attribution::DeniedByNetworkPolicy => "denied_by_network_policy",
            Attribution::DroppedByFirewallRuleNetworkPolicyDoesNotExplain => {
                "dropped_by_firewall_rule_network_policy_does_not_explain"
            }
            Attribution::DroppedByKernelForNonPolicyReason => "dropped_by_kernel_for_non_policy_reason",
            Attribution::AllowedByNetworkPolicy => "allowed_by_network_policy",
            Attribution::NotIsolated => "not_isolated",
            Attribution::NodeTraffic => "node_traffic",
            Attribution::ForwardedDespiteNetworkPolicy => "forwarded_despite_network_policy",
            Attribution::Reply => "reply",
            Attribution::ServiceWithoutEndpoints => "service_without_endpoints",
            Attribution::FirewallReply => "firewall_reply",
            Attribution::NotApplicable => "not_applicable",
        }
    }
}

/// The side(s) of a flow whose policies decided it: the destination's ingress, the source's
/// egress, or both.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicySides {
    Ingress,
    Egress,
    Both,
}

impl PolicySides {
    /// The sides of these directions; none for none.
    pub fn of(directions: impl IntoIterator<Item = Direction>) -> Option<Self> {
        let (mut ingress, mut egress) = (false, false);
        for direction in directions {
            match direction {
                Direction::Ingress => ingress = true,
                Direction::Egress => egress = true,
            }
        }
        match (ingress, egress) {
            (true, true) => Some(PolicySides::Both),
            (true, false) => Some(PolicySides::Ingress),
            (false, true) => Some(PolicySides::Egress),
            (false, false) => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PolicySides::Ingress => "ingress",
            PolicySides::Egress => "egress",
            PolicySides::Both => "both",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyVerdict {
    /// The engine's verdict; none when not evaluated.
    pub verdict: Option<Verdict>,
    /// Which side decided (denied), or where the allowing policies sit (allowed).
    pub direction: Option<PolicySides>,
    pub attribution: Attribution,
    /// Denied by NetworkPolicy: the isolating policies of the denying side(s). Forwarded and
    /// allowed: the allowing policies. None for a drop NetworkPolicy does not explain (the sides
    /// still say what the policies would do).
    pub policies: Vec<PolicyRef>,
    pub summary: String,
    /// What the source pod's egress policies say (absent when the source is not a pod, or the
    /// flow was not evaluated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<SideVerdict>,
    /// What the destination pod's ingress policies say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<SideVerdict>,
}

impl PolicyVerdict {
    /// A flow NetworkPolicy was not asked about: a reply, another protocol, a reject's answer.
    pub fn unjudged(attribution: Attribution, summary: String) -> Self {
        PolicyVerdict {
            verdict: None,
            direction: None,
            attribution,
            policies: vec![],
            summary,
            egress: None,
            ingress: None,
        }
    }

    /// Who decided, in words: for a drop NetworkPolicy denied, each denying side with the policies
    /// isolating its pod and the rule that came nearest; for an allowed flow, the rules that admit
    /// it on each side. None where no policy decided, or the sides were not recorded.
    pub fn blame(&self) -> Option<String> {
        match self.attribution {
            Attribution::DeniedByNetworkPolicy => {
                let denied: Vec<String> = self
                    .denying_sides()
                    .map(|(direction, side)| {
                        let mut isolated_by: Vec<String> = side.isolated_by.iter().map(|p| p.to_string()).collect();
                        isolated_by.sort_unstable();
                        let nearest = side.nearest.as_ref().map(|n| format!("; nearest {n}")).unwrap_or_default();
                        format!(
                            "{} of {} (isolated by {}{nearest})",
                            direction.as_str(),
                            side.pod,
                            isolated_by.join(",")
                        )
                    })
                    .collect();
                (!denied.is_empty()).then(|| format!("denied by {}", denied.join(" and ")))
            }
            Attribution::AllowedByNetworkPolicy => {
                let allowed: Vec<String> = [(Direction::Egress, &self.egress), (Direction::Ingress, &self.ingress)]
                    .into_iter()
                    .filter_map(|(direction, side)| Some((direction, side.as_ref()?)))
                    .filter(|(_, side)| !side.allowed_by.is_empty())
                    .map(|(direction, side)| {
                        let rules: Vec<String> =
                            side.allowed_by.iter().map(|rule| format!("{} rule {}", rule.policy, rule.rule)).collect();
                        format!("{} of {} by {}", direction.as_str(), side.pod, rules.join(","))
                    })
                    .collect();
                (!allowed.is_empty()).then(|| format!("allowed on {}", allowed.join(" and ")))
            }
            _ => None,
        }
    }

    /// The sides whose policies deny the flow, egress first.
    pub fn denying_sides(&self) -> impl Iterator<Item = (Direction, &SideVerdict)> {
        [(Direction::Egress, &self.egress), (Direction::Ingress, &self.ingress)]
            .into_iter()
            .filter_map(|(direction, side)| Some((direction, side.as_ref()?)))
            .filter(|(_, side)| side.verdict == Verdict::Denied)
    }
}

/// What the policies of the pod at one end say about a flow, in their direction.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SideVerdict {
    /// `namespace/pod` whose policies these are.
    pub pod: String,
    pub verdict: Verdict,
    /// The policies that select the pod for this direction. With none the pod is not isolated in
    /// it, and the side allows every flow.
    pub isolated_by: Vec<PolicyRef>,
    /// Allowed: the rules that admit the flow.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_by: Vec<RuleRef>,
    /// Denied: the rule that came nearest to admitting it (none when the policies have no rule
    /// for this direction: a default deny), and what it lacks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nearest: Option<NearestRule>,
}

impl SideVerdict {
    /// The namespace of the pod whose policies these are.
    pub fn namespace(&self) -> &str {
        self.pod.split_once('/').map_or(&self.pod, |(namespace, _)| namespace)
    }

    /// The isolating policies' names, sorted: they are all in the pod's namespace.
    pub fn isolated_by_names(&self) -> String {
        let mut names: Vec<&str> = self.isolated_by.iter().map(|p| p.name.as_str()).collect();
        names.sort_unstable();
        names.join(",")
    }
}

/// A rule that came nearest to admitting a denied flow.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NearestRule {
    pub policy: PolicyRef,
    /// Its index among the policy's rules for the direction; none for a policy with no rule for
    /// it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<usize>,
    pub summary: String,
}

impl std::fmt::Display for NearestRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.rule {
            Some(rule) => write!(f, "{} rule {rule}", self.policy),
            None => write!(f, "{} (no rules: default deny)", self.policy),
        }
    }
}

/// The flow record's schema. Raised when a field changes meaning or goes away (adding a field does
/// not raise it), so that a reader refuses records it would misread.
pub const FLOW_SCHEMA: u32 = 2;

mod schema {
    use serde::{Deserialize, Deserializer};

    /// Records stored before the field existed are of the first schema.
    pub fn first() -> u32 {
        1
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        let schema = u32::deserialize(d)?;
        if schema > super::FLOW_SCHEMA {
            return Err(serde::de::Error::custom(format!(
                "flow records of schema {schema} are newer than this netiso reads (up to {}): upgrade netiso",
                super::FLOW_SCHEMA
            )));
        }
        Ok(schema)
    }
}

/// Where a record's packet was seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObservationPoint {
    /// Leaving a pod, at its interface on the node (before netfilter, routing and kube-proxy).
    PodEgress,
    /// Entering a pod, at its interface on the node (after them).
    PodIngress,
    /// Freed by the node's network stack: netfilter, routing, a qdisc, a socket of the node.
    Node,
    /// Freed inside a pod's own network namespace.
    Pod,
}

impl ObservationPoint {
    pub fn of(event: EventKind, direction: Option<PacketDirection>, in_pod_namespace: bool) -> Option<Self> {
        match (event, direction) {
            (EventKind::Drop, _) if in_pod_namespace => Some(ObservationPoint::Pod),
            (EventKind::Drop, _) => Some(ObservationPoint::Node),
            (EventKind::Flow, Some(PacketDirection::FromPod)) => Some(ObservationPoint::PodEgress),
            (EventKind::Flow, Some(PacketDirection::ToPod)) => Some(ObservationPoint::PodIngress),
            (EventKind::Flow, None) => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// [`FLOW_SCHEMA`] of the netiso that wrote the record.
    #[serde(default = "schema::first", deserialize_with = "schema::deserialize")]
    pub schema: u32,
    #[serde(with = "id_string")]
    pub id: u64,
    /// First packet.
    #[serde(with = "rfc3339")]
    pub time: SystemTime,
    #[serde(with = "rfc3339")]
    pub last_seen: SystemTime,
    pub node: String,
    pub verdict: FlowVerdict,
    pub protocol: IpProtocol,
    pub source: Identity,
    pub destination: Identity,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp_type: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp_code: Option<u8>,
    /// The kernel's drop reason (`NETFILTER_DROP`, ...); none for forwarded flows.
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason_class: Option<ReasonClass>,
    /// The kernel gave no reason (before 5.17): `reason` was inferred from `location`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reason_inferred: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direction: Option<PacketDirection>,
    /// Where netiso saw the packet (absent from records written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_at: Option<ObservationPoint>,
    #[serde(default)]
    pub is_reply: bool,
    pub packets: u64,
    pub bytes: u64,
    /// The attempts this record stands for, by source port. A dropped conversation retried from
    /// fresh source ports (a flood of connection attempts) is one record that counts them, as
    /// Calico's flow logs aggregate denied flows by default; its source port is the first
    /// attempt's. One for every other record.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub attempts: u64,
    /// A port scan's summary: the destination ports one source tried at one destination beyond
    /// those recorded one by one, all judged alike (`destination.port` is 0). Its attempts,
    /// packets and bytes are theirs together; its evidence is that of the first port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<PortSweep>,
    pub policy: PolicyVerdict,
    /// The inventory could not be refreshed when this record was made.
    #[serde(default)]
    pub inventory_stale: bool,
    /// Kept for the evidence bundle, left out of listings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<Evidence>,
}

/// The destination ports of a scan summary.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSweep {
    pub count: u32,
    /// Every port, as ascending ranges: `1-1024,8080`.
    pub ranges: String,
}

impl PortSweep {
    /// The ranges, as (first, last) pairs; a malformed range is left out.
    pub fn ranges(&self) -> impl Iterator<Item = (u16, u16)> + '_ {
        self.ranges.split(',').filter_map(|range| {
            let (first, last) = range.split_once('-').unwrap_or((range, range));
            Some((first.trim().parse().ok()?, last.trim().parse().ok()?))
        })
    }

    pub fn contains(&self, port: u16) -> bool {
        self.ranges().any(|(first, last)| (first..=last).contains(&port))
    }

    /// Every port, ascending.
    pub fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.ranges().flat_map(|(first, last)| first..=last)
    }
}

fn one() -> u64 {
    1
}

fn is_one(n: &u64) -> bool {
    *n == 1
}

/// What proves a record's verdict: the engine's evaluation and, for drops, the NetworkPolicy
/// objects in force when the flow was judged.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    pub explanation: Explanation,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<NetworkPolicy>,
}

/// A line of a followed stream (`GET /v1/flows?follow=true`) that is not a record: what its reader
/// should know (records skipped), or why the stream ends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StreamNotice {
    pub error: String,
    /// The server ends the stream after this line.
    #[serde(rename = "final", default, skip_serializing_if = "std::ops::Not::not")]
    pub ends: bool,
}

/// One line of a newline-delimited JSON stream.
pub fn ndjson_line(value: &impl Serialize) -> String {
    let mut line = serde_json::to_string(value).unwrap_or_default();
    line.push('\n');
    line
}

/// Most records one `GET /v1/flows` may return.
pub const MAX_LIMIT: usize = 10_000;

/// `GET /v1/flows`: records without their evidence, newest first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlowList {
    pub flows: Vec<FlowRecord>,
    /// More records match: a client that needs them all asks again with `before=<next>` (or
    /// `after=<next>` when it asked for the oldest first).
    #[serde(default)]
    pub more: bool,
    /// When `more`: the id to pass as `before` (or `after`) for the next page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// `GET /v1/flows/{id}/evidence`: one record and everything that explains it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvidenceBundle {
    pub record: FlowRecord,
    pub kernel: KernelFacts,
    pub policies_in_force: Vec<NetworkPolicy>,
    pub labels: EndLabels,
    pub evaluation: Option<Explanation>,
    pub suggested_policy: Option<Suggestion>,
}

/// What the kernel said about the packet.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KernelFacts {
    pub reason: Option<String>,
    pub reason_class: Option<ReasonClass>,
    #[serde(default)]
    pub reason_inferred: bool,
    pub location: Option<String>,
    pub interface: Option<String>,
}

/// The labels of both ends and of their namespaces, as the flow was judged.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EndLabels {
    pub source: Option<Labels>,
    pub destination: Option<Labels>,
    pub source_namespace: Option<Labels>,
    pub destination_namespace: Option<Labels>,
}

impl EvidenceBundle {
    pub fn of(mut r: FlowRecord) -> Self {
        let (policies_in_force, evaluation) = match r.evidence.take() {
            Some(Evidence { explanation, policies }) => (policies, Some(explanation)),
            None => (vec![], None),
        };
        // Also kept inside the evaluation: the bundle shows it on its own for responders.
        let suggested_policy = evaluation.as_ref().and_then(|x| x.suggestion.clone());
        EvidenceBundle {
            kernel: KernelFacts {
                reason: r.reason.clone(),
                reason_class: r.reason_class,
                reason_inferred: r.reason_inferred,
                location: r.location.clone(),
                interface: r.interface.clone(),
            },
            policies_in_force,
            labels: EndLabels {
                source: r.source.labels.clone(),
                destination: r.destination.labels.clone(),
                source_namespace: evaluation.as_ref().and_then(|x| x.flow.from.namespace_labels.clone()),
                destination_namespace: evaluation.as_ref().and_then(|x| x.flow.to.namespace_labels.clone()),
            },
            record: r,
            evaluation,
            suggested_policy,
        }
    }
}

impl FlowRecord {
    /// The record as listed: without its evidence.
    pub fn listed(mut self) -> FlowRecord {
        self.evidence = None;
        self
    }

    /// Namespaces of both ends, for the index.
    pub fn namespaces(&self) -> Vec<&str> {
        let mut v: Vec<&str> =
            [&self.source.namespace, &self.destination.namespace].into_iter().flatten().map(String::as_str).collect();
        v.dedup();
        v
    }

    pub fn pods(&self) -> Vec<String> {
        let mut v: Vec<String> = [self.source.pod_key(), self.destination.pod_key()].into_iter().flatten().collect();
        v.dedup();
        v
    }

    pub fn policy_keys(&self) -> Vec<String> {
        self.policy.policies.iter().map(|p| format!("{}/{}", p.namespace, p.name)).collect()
    }
}
