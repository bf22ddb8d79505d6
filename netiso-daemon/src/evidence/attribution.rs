//! What explains a flow record, stated explicitly: the engine's verdict set against what the kernel
//! did (dropped or forwarded, and whether the drop was netfilter's, where NetworkPolicy is
//! enforced).

use super::record::{Attribution, PolicySides, PolicyVerdict};
use crate::policy::explain::DirectionReport;
use crate::policy::{Explanation, PolicyRef, Verdict};

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
                policies,
                summary: reasons.join("; "),
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
            PolicyVerdict { verdict: Some(Verdict::Allowed), direction, attribution, policies, summary }
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
    fn an_allowed_flow_names_the_allowing_policy_and_a_netfilter_drop_of_it_is_another_rule() {
        let x = explanation(ALLOW_WEB);
        let allowed = attribute(&x, false, false);
        assert_eq!(allowed.attribution, Attribution::AllowedByNetworkPolicy);
        assert_eq!(allowed.policies[0].name, "allow");
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
