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
            let attribution = match (dropped, policy_drop, isolated.is_empty()) {
                (true, true, _) => Attribution::DroppedByFirewallRuleNetworkPolicyDoesNotExplain,
                (true, false, _) => Attribution::DroppedByKernelForNonPolicyReason,
                (false, _, true) => Attribution::NotIsolated,
                (false, _, false) => Attribution::AllowedByNetworkPolicy,
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
        let mut m = Manifests::default();
        parse_into(Path::new("cluster.yaml"), &format!("{PODS}---\n{policies}"), &mut m).unwrap();
        let flow =
            Flow { from: "a/client".parse().unwrap(), to: "a/web".parse().unwrap(), port: 80, protocol: Protocol::Tcp };
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
}
