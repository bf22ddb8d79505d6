//! What explains a flow record, stated explicitly: the engine's verdict set against what the kernel
//! did (dropped or forwarded, and whether the drop was netfilter's, where NetworkPolicy is
//! enforced).

use super::record::{Attribution, NearestRule, PolicySides, PolicyVerdict, SideVerdict};
use crate::policy::explain::{DirectionReport, MissKind};
use crate::policy::{Explanation, PolicyRef, Verdict};

/// What one direction's report says of the pod at that end; none when that end is not a pod.
fn side(d: &DirectionReport) -> Option<SideVerdict> {
    let nearness = |kind: MissKind| match kind {
        MissKind::PortOnly | MissKind::PeerOnly => 0,
        MissKind::PeerAndPort => 1,
        MissKind::NoRules => 2,
    };
    let nearest = (d.verdict == Verdict::Denied)
        .then(|| d.nearest_misses.iter().min_by_key(|miss| nearness(miss.kind)))
        .flatten()
        .map(|miss| NearestRule { policy: miss.policy.clone(), rule: miss.rule, summary: miss.summary.clone() });
    Some(SideVerdict {
        pod: d.subject.clone()?,
        verdict: d.verdict,
        isolated_by: d.isolating_policies.clone(),
        allowed_by: if d.isolated { d.allowed_by.clone() } else { vec![] },
        nearest,
    })
}

fn denied_side(x: &Explanation) -> (Option<PolicySides>, Vec<PolicyRef>) {
    let denied: Vec<&DirectionReport> =
        [&x.egress, &x.ingress].into_iter().filter(|d| d.verdict == Verdict::Denied).collect();
    let direction = PolicySides::of(denied.iter().map(|d| d.direction));
    let mut policies: Vec<PolicyRef> = denied.iter().flat_map(|d| d.isolating_policies.iter().cloned()).collect();
    policies.dedup();
    (direction, policies)
}

/// The attribution of a flow record from the engine's explanation and what the kernel did.
pub fn attribute(x: &Explanation, dropped: bool, policy_drop: bool) -> PolicyVerdict {
    let summary_of = |d: &DirectionReport| d.summary.clone();
    match x.verdict {
        Verdict::Denied => {
            let (direction, policies) = denied_side(x);
            let reasons: Vec<String> =
                [&x.egress, &x.ingress].into_iter().filter(|d| d.verdict == Verdict::Denied).map(summary_of).collect();
            let attribution = match (dropped, policy_drop) {
                (true, true) => Attribution::DeniedByNetworkPolicy,
                (true, false) => Attribution::DroppedByKernelForNonPolicyReason,
                (false, _) => Attribution::ForwardedDespiteNetworkPolicy,
            };
            PolicyVerdict {
                verdict: Some(Verdict::Denied),
                direction,
                attribution,
                // Only a drop NetworkPolicy explains names policies as its cause.
                policies: if attribution == Attribution::DeniedByNetworkPolicy { policies } else { vec![] },
                summary: reasons.join("; "),
                egress: side(&x.egress),
                ingress: side(&x.ingress),
            }
        }
        Verdict::Allowed => {
            let isolated: Vec<&DirectionReport> = [&x.egress, &x.ingress].into_iter().filter(|d| d.isolated).collect();
            let mut policies: Vec<PolicyRef> =
                isolated.iter().flat_map(|d| d.allowed_by.iter().map(|r| r.policy.clone())).collect();
            policies.dedup();
            let direction = PolicySides::of(isolated.iter().map(|d| d.direction));
            let own_node = isolated.iter().any(|d| d.own_node.is_some());
            let attribution = match (dropped, policy_drop, isolated.is_empty(), own_node) {
                (true, true, ..) => Attribution::DroppedByFirewallRuleNetworkPolicyDoesNotExplain,
                (true, false, ..) => Attribution::DroppedByKernelForNonPolicyReason,
                (false, _, true, _) => Attribution::NotIsolated,
                (false, _, false, true) => Attribution::NodeTraffic,
                (false, _, false, false) => Attribution::AllowedByNetworkPolicy,
            };
            let summary = match attribution {
                Attribution::DroppedByFirewallRuleNetworkPolicyDoesNotExplain => {
                    "NetworkPolicy allows this flow: a firewall rule outside NetworkPolicy dropped it".to_owned()
                }
                _ => isolated.iter().map(|d| summary_of(d)).collect::<Vec<_>>().join("; "),
            };
            PolicyVerdict {
                verdict: Some(Verdict::Allowed),
                direction,
                attribution,
                // Allowing policies did not drop a dropped flow.
                policies: if dropped { vec![] } else { policies },
                summary,
                egress: side(&x.egress),
                ingress: side(&x.ingress),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::inventory::manifests::{Manifests, parse_into};
    use crate::policy::{Flow, PolicyEngine, Protocol};

    const PODS: &str = "kind: Namespace\nmetadata: {name: a}\n---\nkind: Pod\nmetadata: {name: web, namespace: a, labels: {app: web}}\nstatus: {podIP: 10.0.0.1}\n---\nkind: Pod\nmetadata: {name: client, namespace: a}\nstatus: {podIP: 10.0.0.2}\n";
    const DENY_WEB: &str =
        "kind: NetworkPolicy\nmetadata: {name: deny, namespace: a}\nspec: {podSelector: {matchLabels: {app: web}}}\n";
    const ALLOW_WEB: &str = "kind: NetworkPolicy\nmetadata: {name: allow, namespace: a}\nspec: {podSelector: {matchLabels: {app: web}}, ingress: [{}]}\n";

    /// client -> web on TCP/80 under `policies`.
    fn explanation(policies: &str) -> Explanation {
        explanation_from("a/client", policies)
    }

    /// `from` -> web on TCP/80 under `objects`.
    fn explanation_from(from: &str, objects: &str) -> Explanation {
        let mut m = Manifests::default();
        parse_into(Path::new("cluster.yaml"), &format!("{PODS}---\n{objects}"), &mut m).unwrap();
        let flow =
            Flow { from: from.parse().unwrap(), to: "a/web".parse().unwrap(), port: 80, protocol: Protocol::Tcp };
        PolicyEngine::new(m.state).explain(&flow).unwrap()
    }

    #[test]
    fn a_denied_flow_is_a_policy_drop_another_drop_or_forwarded_despite_policy() {
        let x = explanation(DENY_WEB);
        let denied = attribute(&x, true, true);
        assert_eq!(denied.attribution, Attribution::DeniedByNetworkPolicy);
        assert_eq!((denied.direction, denied.policies[0].name.as_str()), (Some(PolicySides::Ingress), "deny"));
        assert_eq!(attribute(&x, true, false).attribution, Attribution::DroppedByKernelForNonPolicyReason);
        assert_eq!(attribute(&x, false, false).attribution, Attribution::ForwardedDespiteNetworkPolicy);
    }

    #[test]
    fn a_policy_drop_names_its_denying_side_and_nearest_rule_and_no_other_drop_names_policies() {
        let allow_8080 = "kind: NetworkPolicy\nmetadata: {name: allow-8080, namespace: a}\nspec: {podSelector: {matchLabels: {app: web}}, ingress: [{from: [{podSelector: {}}], ports: [{port: 8080}]}]}\n";
        let x = explanation(&format!("{DENY_WEB}---\n{allow_8080}"));
        let denied = attribute(&x, true, true);
        let ingress = denied.ingress.as_ref().expect("web is a pod");
        assert_eq!((ingress.pod.as_str(), ingress.verdict), ("a/web", Verdict::Denied));
        assert_eq!(ingress.isolated_by_names(), "allow-8080,deny");
        let nearest = ingress.nearest.as_ref().expect("a rule came near");
        assert_eq!((nearest.policy.name.as_str(), nearest.rule), ("allow-8080", Some(0)), "it lacks only the port");
        let egress = denied.egress.as_ref().expect("client is a pod");
        assert_eq!(
            (egress.verdict, egress.isolated_by.len()),
            (Verdict::Allowed, 0),
            "client's egress is not isolated"
        );
        assert_eq!(denied.denying_sides().count(), 1);
        assert_eq!(
            denied.blame().as_deref(),
            Some("denied by ingress of a/web (isolated by a/allow-8080,a/deny; nearest a/allow-8080 rule 0)")
        );
        // The kernel dropped it for another reason (OTHERHOST, no socket): policies are not its cause.
        let other = attribute(&x, true, false);
        assert_eq!(other.attribution, Attribution::DroppedByKernelForNonPolicyReason);
        assert!(other.policies.is_empty(), "{:?}", other.policies);
        assert_eq!(other.blame(), None);
        assert_eq!(other.ingress, denied.ingress, "what the policies would do is still recorded");
        // A default deny alone: no rule came near.
        let x = explanation(DENY_WEB);
        let only_deny = attribute(&x, true, true);
        assert_eq!(only_deny.ingress.as_ref().unwrap().nearest.as_ref().map(|n| n.rule), Some(None));
    }

    #[test]
    fn an_allowed_flow_names_the_allowing_policy_and_a_netfilter_drop_of_it_is_another_rule() {
        let x = explanation(ALLOW_WEB);
        let allowed = attribute(&x, false, false);
        assert_eq!(allowed.attribution, Attribution::AllowedByNetworkPolicy);
        assert_eq!(allowed.policies[0].name, "allow");
        assert_eq!(allowed.blame().as_deref(), Some("allowed on ingress of a/web by a/allow rule 0"));
        assert!(attribute(&x, true, true).policies.is_empty(), "allowing policies did not drop it");
        assert_eq!(
            attribute(&x, true, true).attribution,
            Attribution::DroppedByFirewallRuleNetworkPolicyDoesNotExplain
        );
        assert_eq!(attribute(&x, true, false).attribution, Attribution::DroppedByKernelForNonPolicyReason);
    }

    #[test]
    fn a_flow_no_policy_isolates_is_not_isolated() {
        let x = explanation("kind: Namespace\nmetadata: {name: b}\n");
        let verdict = attribute(&x, false, false);
        assert_eq!(
            (verdict.attribution, verdict.direction, verdict.policies.len()),
            (Attribution::NotIsolated, None, 0)
        );
    }

    #[test]
    fn traffic_from_the_pods_own_node_is_node_traffic_not_a_policy_verdict() {
        // web is isolated and runs on node-1, whose address is 192.168.1.1.
        let node = "kind: Node\nmetadata: {name: node-1}\nstatus: {addresses: [{type: InternalIP, address: 192.168.1.1}]}\n---\nkind: Pod\nmetadata: {name: web, namespace: a, labels: {app: web}}\nspec: {nodeName: node-1, containers: [{name: c, image: i}]}\nstatus: {podIP: 10.0.0.1}\n";
        let x = explanation_from("192.168.1.1", &format!("{node}---\n{DENY_WEB}"));
        let verdict = attribute(&x, false, false);
        assert_eq!((verdict.attribution, verdict.policies.len()), (Attribution::NodeTraffic, 0));
        assert!(verdict.summary.contains("node node-1"), "{}", verdict.summary);
        let dropped = attribute(&x, true, true);
        assert_eq!(dropped.attribution, Attribution::DroppedByFirewallRuleNetworkPolicyDoesNotExplain);
    }
}
