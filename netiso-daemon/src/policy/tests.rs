//! Semantic corners of NetworkPolicy and of the explanation, one test each.

use std::path::Path;

use super::explain::{MissKind, PeerMiss};
use super::*;
use crate::inventory::manifests::{Manifests, parse_into};

/// Namespaces `a` (team=x) and `b` (team=y); pods a/web (app=web, named port http=8080, IPv4 and
/// IPv6), a/db (app=db, http=9090), b/client (app=client), plus the given policies.
fn engine(policies: &str) -> PolicyEngine {
    let base = r#"
kind: Namespace
metadata: {name: a, labels: {team: x}}
---
kind: Namespace
metadata: {name: b, labels: {team: y}}
---
kind: Pod
metadata: {name: web, namespace: a, labels: {app: web, pod-template-hash: 5d8f7c}}
spec: {containers: [{name: c, image: i, ports: [{name: http, containerPort: 8080}, {name: dns, containerPort: 53, protocol: UDP}]}]}
status: {podIPs: [{ip: 10.1.0.1}, {ip: "fd00::1"}]}
---
kind: Pod
metadata: {name: db, namespace: a, labels: {app: db}}
spec: {containers: [{name: c, image: i, ports: [{name: http, containerPort: 9090}]}]}
status: {podIP: 10.1.0.2}
---
kind: Pod
metadata: {name: client, namespace: b, labels: {app: client}}
status: {podIP: 10.2.0.1}
---
kind: Pod
metadata: {name: agent, namespace: b, labels: {app: agent}}
spec: {hostNetwork: true, containers: [{name: c, image: i}]}
status: {podIP: 192.168.0.10}
"#;
    let mut m = Manifests::default();
    parse_into(Path::new("base.yaml"), base, &mut m).unwrap();
    parse_into(Path::new("policies.yaml"), policies, &mut m).unwrap();
    PolicyEngine::new(m.state)
}

fn flow(from: &str, to: &str, port: u16, protocol: Protocol) -> Flow {
    Flow { from: from.parse().unwrap(), to: to.parse().unwrap(), port, protocol }
}

fn allowed(e: &PolicyEngine, from: &str, to: &str, port: u16) -> bool {
    allowed_proto(e, from, to, port, Protocol::Tcp)
}

fn allowed_proto(e: &PolicyEngine, from: &str, to: &str, port: u16, protocol: Protocol) -> bool {
    e.verdict(&flow(from, to, port, protocol)).unwrap() == Verdict::Allowed
}

const DENY_INGRESS_A: &str =
    "kind: NetworkPolicy\nmetadata: {name: deny, namespace: a}\nspec: {podSelector: {}, policyTypes: [Ingress]}\n";

#[test]
fn no_policy_allows_everything() {
    let e = engine("");
    assert!(allowed(&e, "b/client", "a/web", 1234));
    assert!(allowed(&e, "a/web", "203.0.113.9", 443));
}

#[test]
fn an_empty_pod_selector_isolates_every_pod_of_its_namespace_only() {
    let e = engine(DENY_INGRESS_A);
    assert!(!allowed(&e, "b/client", "a/web", 8080));
    assert!(!allowed(&e, "a/db", "a/web", 8080));
    assert!(allowed(&e, "a/web", "b/client", 8080), "namespace b is not isolated");
    assert!(!allowed(&e, "a/web", "a/db", 8080), "a/db is isolated too");
}

#[test]
fn isolation_is_per_direction() {
    let e = engine(
        "kind: NetworkPolicy\nmetadata: {name: eg, namespace: a}\nspec: {podSelector: {matchLabels: {app: web}}, policyTypes: [Egress]}\n",
    );
    assert!(!allowed(&e, "a/web", "b/client", 80), "web's egress is isolated with no rules");
    assert!(allowed(&e, "b/client", "a/web", 80), "web's ingress is not");
}

#[test]
fn policy_types_default_from_the_presence_of_egress_rules() {
    let with_egress = engine(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  egress: [{to: [{podSelector: {matchLabels: {app: db}}}]}]\n",
    );
    assert!(!allowed(&with_egress, "b/client", "a/web", 80), "defaults include Ingress: no ingress rules");
    assert!(!allowed(&with_egress, "a/web", "b/client", 80), "egress rules present: Egress isolated");
    assert!(allowed(&with_egress, "a/web", "a/db", 80));
    let empty_egress = engine(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec: {podSelector: {matchLabels: {app: web}}, egress: []}\n",
    );
    assert!(allowed(&empty_egress, "a/web", "b/client", 80), "egress: [] without policyTypes does not isolate egress");
}

#[test]
fn empty_rule_list_denies_but_a_rule_without_from_or_ports_admits_all() {
    let deny = engine(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec: {podSelector: {}, policyTypes: [Ingress], ingress: []}\n",
    );
    assert!(!allowed(&deny, "b/client", "a/web", 80));
    let allow_all =
        engine("kind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec: {podSelector: {}, ingress: [{}]}\n");
    assert!(allowed(&allow_all, "b/client", "a/web", 80));
    assert!(allowed(&allow_all, "203.0.113.9", "a/web", 5000));
    let empty_lists = engine(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec: {podSelector: {}, ingress: [{from: [], ports: []}]}\n",
    );
    assert!(allowed(&empty_lists, "b/client", "a/web", 80), "from: [] and ports: [] mean all");
}

#[test]
fn pod_and_namespace_selector_in_one_peer_are_anded_in_two_peers_ored() {
    let and = engine(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec:\n  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {team: y}}, podSelector: {matchLabels: {app: web}}}]}]\n",
    );
    assert!(!allowed(&and, "b/client", "a/db", 80), "client is in team y but is not app=web");
    assert!(!allowed(&and, "a/web", "a/db", 80), "web is app=web but not in team y");
    let or = engine(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec:\n  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {team: y}}}, {podSelector: {matchLabels: {app: web}}}]}]\n",
    );
    assert!(allowed(&or, "b/client", "a/db", 80));
    assert!(allowed(&or, "a/web", "a/db", 80));
}

#[test]
fn a_pod_selector_alone_selects_in_the_policy_namespace_and_an_empty_namespace_selector_everywhere() {
    let same_ns = engine(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec: {podSelector: {}, ingress: [{from: [{podSelector: {}}]}]}\n",
    );
    assert!(allowed(&same_ns, "a/web", "a/db", 80));
    assert!(!allowed(&same_ns, "b/client", "a/db", 80));
    let all_ns = engine(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec: {podSelector: {}, ingress: [{from: [{namespaceSelector: {}}]}]}\n",
    );
    assert!(allowed(&all_ns, "b/client", "a/db", 80));
    assert!(!allowed(&all_ns, "203.0.113.9", "a/db", 80), "selectors never match a non-pod address");
}

#[test]
fn match_expressions_select_pods() {
    let e = engine(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec:\n  podSelector: {}\n  ingress: [{from: [{podSelector: {matchExpressions: [{key: app, operator: In, values: [web, cache]}]}}]}]\n",
    );
    assert!(allowed(&e, "a/web", "a/db", 80));
    let not_in = engine(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec:\n  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: team, operator: NotIn, values: [x]}]}}]}]\n",
    );
    assert!(allowed(&not_in, "b/client", "a/db", 80));
    assert!(!allowed(&not_in, "a/web", "a/db", 80));
}

#[test]
fn ip_blocks_with_except_in_both_families_and_for_non_pod_ends() {
    let e = engine(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{ipBlock: {cidr: 203.0.113.0/24, except: [203.0.113.128/25]}}, {ipBlock: {cidr: 'fd00:dead::/32'}}]\n",
    );
    assert!(allowed(&e, "a/web", "203.0.113.9", 443));
    assert!(!allowed(&e, "a/web", "203.0.113.200", 443), "in except");
    assert!(allowed(&e, "a/web", "fd00:dead::5", 443));
    assert!(!allowed(&e, "a/web", "fd00:beef::5", 443));
    assert!(!allowed(&e, "a/web", "b/client", 443), "client's IP 10.2.0.1 is outside the blocks");
}

#[test]
fn ip_blocks_match_pod_addresses_and_non_pod_sources_are_judged_by_them() {
    let e = engine(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.2.0.0/16}}]}]}\n",
    );
    assert!(allowed(&e, "b/client", "a/web", 80), "client's pod IP is in the block");
    assert!(allowed(&e, "10.2.9.9", "a/web", 80));
    assert!(!allowed(&e, "10.3.0.1", "a/web", 80));
    assert!(allowed(&e, "10.3.0.1", "203.0.113.1", 80), "two non-pod ends: no policy applies");
}

#[test]
fn named_ports_resolve_per_destination_pod() {
    let e = engine(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec: {podSelector: {}, ingress: [{ports: [{port: http}]}]}\n",
    );
    assert!(allowed(&e, "b/client", "a/web", 8080));
    assert!(!allowed(&e, "b/client", "a/web", 9090));
    assert!(allowed(&e, "b/client", "a/db", 9090));
    assert!(!allowed(&e, "b/client", "a/db", 8080));
    let egress = engine(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: b}\nspec: {podSelector: {}, policyTypes: [Egress], egress: [{ports: [{port: http}]}]}\n",
    );
    assert!(allowed(&egress, "b/client", "a/db", 9090), "egress named port resolves on the destination pod");
    assert!(!allowed(&egress, "b/client", "203.0.113.1", 9090), "a non-pod destination has no named ports");
}

#[test]
fn protocol_defaults_to_tcp_and_must_match() {
    let e = engine(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec: {podSelector: {}, ingress: [{ports: [{port: 53}]}]}\n",
    );
    assert!(allowed_proto(&e, "b/client", "a/web", 53, Protocol::Tcp));
    assert!(!allowed_proto(&e, "b/client", "a/web", 53, Protocol::Udp));
    let named_udp = engine(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec: {podSelector: {}, ingress: [{ports: [{port: dns, protocol: UDP}]}]}\n",
    );
    assert!(allowed_proto(&named_udp, "b/client", "a/web", 53, Protocol::Udp));
    assert!(!allowed_proto(&named_udp, "b/client", "a/web", 53, Protocol::Tcp));
    let sctp_all = engine(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec: {podSelector: {}, ingress: [{ports: [{protocol: SCTP}]}]}\n",
    );
    assert!(allowed_proto(&sctp_all, "b/client", "a/web", 9999, Protocol::Sctp));
    assert!(!allowed_proto(&sctp_all, "b/client", "a/web", 9999, Protocol::Tcp));
}

#[test]
fn end_port_ranges_are_inclusive() {
    let e = engine(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec: {podSelector: {}, ingress: [{ports: [{port: 8000, endPort: 8080}]}]}\n",
    );
    assert!(allowed(&e, "b/client", "a/web", 8000));
    assert!(allowed(&e, "b/client", "a/web", 8080));
    assert!(!allowed(&e, "b/client", "a/web", 7999));
    assert!(!allowed(&e, "b/client", "a/web", 8081));
}

#[test]
fn several_policies_are_a_union() {
    let e = engine(&format!(
        "{DENY_INGRESS_A}---\nkind: NetworkPolicy\nmetadata: {{name: allow-b, namespace: a}}\nspec: {{podSelector: {{matchLabels: {{app: web}}}}, ingress: [{{from: [{{namespaceSelector: {{matchLabels: {{team: y}}}}}}]}}]}}\n"
    ));
    assert!(allowed(&e, "b/client", "a/web", 80), "allow-b adds to deny");
    assert!(!allowed(&e, "b/client", "a/db", 80), "db is selected only by deny");
}

#[test]
fn a_flow_needs_both_source_egress_and_destination_ingress() {
    let e = engine(
        "kind: NetworkPolicy\nmetadata: {name: in, namespace: a}\nspec: {podSelector: {}, ingress: [{}]}\n---\nkind: NetworkPolicy\nmetadata: {name: out, namespace: b}\nspec: {podSelector: {}, policyTypes: [Egress]}\n",
    );
    assert!(!allowed(&e, "b/client", "a/web", 80), "ingress allows, egress denies");
    let x = e.explain(&flow("b/client", "a/web", 80, Protocol::Tcp)).unwrap();
    assert_eq!(x.egress.verdict, Verdict::Denied);
    assert_eq!(x.ingress.verdict, Verdict::Allowed);
}

#[test]
fn host_network_pods_are_not_selected_and_are_judged_as_addresses() {
    let e = engine(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: b}\nspec: {podSelector: {}, policyTypes: [Egress]}\n---\nkind: NetworkPolicy\nmetadata: {name: q, namespace: a}\nspec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 192.168.0.0/24}}]}]}\n",
    );
    assert!(allowed(&e, "b/agent", "a/web", 80), "agent's egress is not isolated; its node IP is in the block");
    assert!(!allowed(&e, "b/client", "a/web", 80));
}

#[test]
fn an_address_held_by_a_pod_is_that_pod() {
    let e = engine(DENY_INGRESS_A);
    let x = e.explain(&flow("10.2.0.1", "fd00::1", 80, Protocol::Tcp)).unwrap();
    assert_eq!(x.flow.from.pod.as_deref(), Some("client"));
    assert_eq!(x.flow.to.pod.as_deref(), Some("web"));
    assert_eq!(x.verdict, Verdict::Denied);
}

#[test]
fn a_later_policy_with_the_same_name_replaces_the_earlier() {
    let e = engine(&format!(
        "{DENY_INGRESS_A}---\nkind: NetworkPolicy\nmetadata: {{name: deny, namespace: a}}\nspec: {{podSelector: {{matchLabels: {{app: db}}}}, policyTypes: [Ingress]}}\n"
    ));
    assert!(allowed(&e, "b/client", "a/web", 80));
    assert!(!allowed(&e, "b/client", "a/db", 80));
}

#[test]
fn invalid_fields_are_reported_and_fail_closed_while_the_rest_evaluates() {
    let e = engine(
        r#"
kind: NetworkPolicy
metadata: {name: broken, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{ipBlock: {cidr: 10.0.0.0/33}}]
  - from: [{podSelector: {matchExpressions: [{key: app, operator: Like, values: [x]}]}}]
  - ports: [{port: 70000}, {port: 80, endPort: 79}, {port: http, endPort: 90}, {protocol: ICMP}]
---
kind: NetworkPolicy
metadata: {name: bad-selector, namespace: a}
spec: {podSelector: {matchExpressions: [{key: app, operator: In}]}}
---
kind: NetworkPolicy
metadata: {name: fine, namespace: a}
spec: {podSelector: {matchLabels: {app: db}}, ingress: [{from: [{namespaceSelector: {}}]}]}
"#,
    );
    let fields: Vec<String> = e.errors().iter().map(|err| err.to_string()).collect();
    let expect = [
        "NetworkPolicy a/broken: spec.ingress[0].from[0].ipBlock.cidr",
        "NetworkPolicy a/broken: spec.ingress[1].from[0].podSelector.matchExpressions[0].operator",
        "NetworkPolicy a/broken: spec.ingress[2].ports[0].port",
        "NetworkPolicy a/broken: spec.ingress[2].ports[1].endPort",
        "NetworkPolicy a/broken: spec.ingress[2].ports[2].endPort",
        "NetworkPolicy a/broken: spec.ingress[2].ports[3].protocol",
        "NetworkPolicy a/bad-selector: spec.podSelector.matchExpressions[0].values",
    ];
    for (want, got) in expect.iter().zip(&fields) {
        assert!(got.starts_with(want), "{got} should start with {want}");
    }
    assert_eq!(fields.len(), expect.len(), "{fields:#?}");
    assert!(!allowed(&e, "b/client", "a/web", 80), "broken still isolates web; its bad parts match nothing");
    assert!(allowed(&e, "b/client", "a/db", 80), "fine is evaluated");
    assert_eq!(e.policies().len(), 2, "bad-selector cannot say whom it selects and is dropped");
}

#[test]
fn default_deny_is_attributed_with_no_rules() {
    let e = engine(DENY_INGRESS_A);
    let x = e.explain(&flow("b/client", "a/web", 8080, Protocol::Tcp)).unwrap();
    assert_eq!(x.verdict, Verdict::Denied);
    assert!(x.ingress.isolated);
    assert_eq!(x.ingress.isolating_policies[0].name, "deny");
    assert_eq!(x.ingress.nearest_misses[0].kind, MissKind::NoRules);
    assert!(x.ingress.nearest_misses[0].summary.contains("default deny"), "{}", x.ingress.nearest_misses[0].summary);
    assert!(!x.egress.isolated);
}

#[test]
fn nearest_miss_says_which_namespace_label_failed() {
    let e = engine(
        "kind: NetworkPolicy\nmetadata: {name: from-y, namespace: a, resourceVersion: '42'}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {team: y}}}], ports: [{port: 8080}]}]\n",
    );
    let x = e.explain(&flow("a/db", "a/web", 8080, Protocol::Tcp)).unwrap();
    let miss = &x.ingress.nearest_misses[0];
    assert_eq!(miss.kind, MissKind::PeerOnly);
    assert_eq!(miss.policy.resource_version.as_deref(), Some("42"));
    match &miss.peer_misses[0] {
        PeerMiss::NamespaceLabels { namespace, misses, .. } => {
            assert_eq!(namespace, "a");
            assert_eq!(misses[0].to_string(), "needs team=y but has team=x");
        }
        other => panic!("unexpected {other:?}"),
    }
    let port_miss = e.explain(&flow("b/client", "a/web", 9000, Protocol::Tcp)).unwrap();
    assert_eq!(port_miss.ingress.nearest_misses[0].kind, MissKind::PortOnly);
    assert!(port_miss.ingress.nearest_misses[0].summary.contains("TCP/8080"));
}

#[test]
fn allowed_flows_name_the_policy_rule_peer_and_port() {
    let e = engine(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec:\n  podSelector: {}\n  ingress:\n  - from: [{ipBlock: {cidr: 1.0.0.0/8}}, {namespaceSelector: {matchLabels: {team: y}}}]\n    ports: [{port: 1}, {port: 8080}]\n",
    );
    let x = e.explain(&flow("b/client", "a/web", 8080, Protocol::Tcp)).unwrap();
    let by = &x.ingress.allowed_by[0];
    assert_eq!((by.policy.name.as_str(), by.rule, by.peer, by.port), ("p", 0, Some(1), Some(1)));
}

fn with_suggestion(policies: &str, f: &Flow) -> PolicyEngine {
    let e = engine(policies);
    assert_eq!(e.explain(f).unwrap().suggestion, None, "asked for, not built by every explanation");
    let x = super::suggest::explain_with_suggestion(&e, f).unwrap();
    let s = x.suggestion.expect("denied flows get a suggestion");
    assert!(s.verified);
    assert!(!s.yaml.contains("pod-template-hash"), "{}", s.yaml);
    engine(&format!("{policies}---\n{}", s.yaml))
}

#[test]
fn the_suggested_policy_allows_exactly_the_flow() {
    let deny_all = "kind: NetworkPolicy\nmetadata: {name: deny, namespace: a}\nspec: {podSelector: {}, policyTypes: [Ingress, Egress]}\n---\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: b}\nspec: {podSelector: {}, policyTypes: [Ingress, Egress]}\n";
    let f = flow("b/client", "a/web", 8080, Protocol::Tcp);
    let after = with_suggestion(deny_all, &f);
    assert_eq!(after.verdict(&f).unwrap(), Verdict::Allowed);
    assert!(!allowed(&after, "b/client", "a/web", 8081), "other ports stay denied");
    assert!(!allowed(&after, "b/client", "a/db", 8080), "other pods stay denied");
    assert!(!allowed(&after, "a/db", "a/web", 8080), "other sources stay denied");

    let to_world = flow("a/web", "203.0.113.7", 443, Protocol::Tcp);
    let after = with_suggestion(deny_all, &to_world);
    assert_eq!(after.verdict(&to_world).unwrap(), Verdict::Allowed);
    assert!(!allowed(&after, "a/web", "203.0.113.8", 443));
}

#[test]
fn unknown_pods_are_an_error_not_a_panic() {
    let e = engine("");
    assert_eq!(e.verdict(&flow("a/nope", "a/web", 1, Protocol::Tcp)), Err(EngineError::UnknownPod("a/nope".into())));
}

/// a/web runs on node-1 (a Node object with two addresses, and host-network b/kubelet-agent);
/// a/db on node-2; both ingress- and egress-isolated with nothing allowed.
fn engine_on_nodes() -> PolicyEngine {
    engine(
        r#"
kind: Node
metadata: {name: node-1}
status: {addresses: [{type: InternalIP, address: 192.168.1.1}, {type: Hostname, address: node-1}, {type: InternalIP, address: "fd00:1::1"}]}
---
kind: Node
metadata: {name: node-2}
status: {addresses: [{type: InternalIP, address: 192.168.1.2}]}
---
kind: Pod
metadata: {name: web, namespace: a, labels: {app: web}}
spec: {nodeName: node-1, containers: [{name: c, image: i}]}
status: {podIP: 10.1.0.1}
---
kind: Pod
metadata: {name: db, namespace: a, labels: {app: db}}
spec: {nodeName: node-2, containers: [{name: c, image: i}]}
status: {podIP: 10.1.0.2}
---
kind: Pod
metadata: {name: kubelet-agent, namespace: b}
spec: {nodeName: node-1, hostNetwork: true, containers: [{name: c, image: i}]}
status: {podIP: 192.168.1.50}
---
kind: NetworkPolicy
metadata: {name: deny, namespace: a}
spec: {podSelector: {}, policyTypes: [Ingress, Egress]}
"#,
    )
}

#[test]
fn traffic_between_a_pod_and_its_own_node_is_always_allowed() {
    let e = engine_on_nodes();
    for node_address in ["192.168.1.1", "fd00:1::1", "192.168.1.50", "b/kubelet-agent"] {
        assert!(allowed(&e, node_address, "a/web", 8080), "{node_address} is web's node");
        assert!(allowed(&e, "a/web", node_address, 10250), "web may reach its node at {node_address}");
    }
    assert!(!allowed(&e, "192.168.1.2", "a/web", 8080), "another node is just an address");
    assert!(!allowed(&e, "192.168.1.1", "a/db", 8080), "node-1 is not db's node");
    assert!(!allowed(&e, "192.168.9.9", "a/web", 8080));

    let x = e.explain(&flow("192.168.1.1", "a/web", 8080, Protocol::Tcp)).unwrap();
    assert_eq!(x.verdict, Verdict::Allowed);
    assert_eq!(x.ingress.own_node.as_deref(), Some("node-1"));
    assert!(x.ingress.isolated && x.ingress.allowed_by.is_empty(), "no rule allows it: {:?}", x.ingress);
    assert!(x.ingress.summary.contains("its own node is always allowed"), "{}", x.ingress.summary);
    let other = e.explain(&flow("192.168.1.2", "a/web", 8080, Protocol::Tcp)).unwrap();
    assert_eq!(other.ingress.own_node, None);
    assert_eq!(other.verdict, Verdict::Denied);
}
