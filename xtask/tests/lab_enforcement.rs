//! The lab's enforcement (netiso's engine compiled into nftables rules, as an iptables/nftables
//! CNI enforces NetworkPolicy) decides real packets exactly as the engine does, for the shapes
//! policies take beyond the course baseline: named ports, port ranges, ipBlock with except,
//! namespace and pod selectors together, matchExpressions, egress by protocol, both families.

use std::path::Path;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use xtask::lab::{self, End, Probe, ProbeKind, scenario};

const POLICIES: &str = r#"
# production/api: ingress only from ingress-nginx's controller, on the named port.
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api-from-ingress, namespace: production}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress:
    - from:
        - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: ingress-nginx}}
          podSelector: {matchLabels: {app.kubernetes.io/name: ingress-nginx}}
      ports: [{port: http}]
---
# staging/web: ingress from develop's debug pods, on a range of ports.
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-debug, namespace: staging}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
    - from:
        - namespaceSelector: {matchExpressions: [{key: env, operator: In, values: [develop]}]}
          podSelector: {matchExpressions: [{key: app, operator: Exists}]}
      ports: [{port: 8000, endPort: 8090, protocol: TCP}]
---
# develop: egress to the pod network except production/api, TCP 8080 and UDP 53 only.
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: develop-egress, namespace: develop}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
    - to: [{ipBlock: {cidr: 10.244.0.0/24, except: [10.244.0.30/32]}}]
      ports: [{port: 8080, protocol: TCP}, {port: 53, protocol: UDP}]
"#;

fn policies() -> Vec<NetworkPolicy> {
    serde_saphyr::from_multiple(POLICIES).expect("the test's policies parse")
}

/// Probes to the pods that serve (a probe to a pod without a server fails whatever the policy).
fn probes() -> Vec<Probe> {
    let probe = |from: &str, to: &str, ipv6: bool, port: u16, kind: ProbeKind| Probe {
        from: End::Pod(scenario::pod(from)),
        to: End::Pod(scenario::pod(to)),
        ipv6,
        port,
        kind,
        source_port: 0,
    };
    let mut list = vec![
        probe("ingress-nginx/controller", "production/api", false, 8080, ProbeKind::Tcp),
        probe("ingress-nginx/controller", "production/api", true, 8080, ProbeKind::Tcp),
        probe("staging/web", "production/api", false, 8080, ProbeKind::Tcp),
        probe("develop/debug", "production/api", false, 8080, ProbeKind::Tcp),
        probe("develop/debug", "staging/web", false, 8080, ProbeKind::Tcp),
        probe("develop/debug", "staging/web", true, 8080, ProbeKind::Tcp),
        probe("ingress-nginx/controller", "staging/web", false, 8080, ProbeKind::Tcp),
        probe("develop/debug", "kube-system/coredns", false, 53, ProbeKind::DnsUdp),
        probe("develop/debug", "kube-system/coredns", false, 53, ProbeKind::DnsTcp),
        probe("staging/web", "kube-system/coredns", false, 53, ProbeKind::DnsTcp),
    ];
    for (i, p) in list.iter_mut().enumerate() {
        p.source_port = 41500 + i as u16;
    }
    list
}

#[test]
fn the_compiled_ruleset_decides_real_packets_as_the_engine_does() {
    let (lab, _scratch) = lab::for_test("e", Path::new(env!("CARGO_BIN_EXE_xtask")));
    let _guard = lab.up_guarded(&policies()).expect("lab comes up");
    let results = lab.traffic_of(probes()).unwrap();
    let disagreements: Vec<String> = results
        .iter()
        .filter(|r| r.observed != r.expected)
        .map(|r| format!("{}: engine {}, packets {}", r.probe, r.expected, r.observed))
        .collect();
    assert!(disagreements.is_empty(), "the enforcement disagrees with the engine:\n{}", disagreements.join("\n"));
    // Both verdicts occur, so the agreement says something.
    let allowed = results.iter().filter(|r| r.expected).count();
    assert!(allowed >= 3 && allowed <= results.len() - 3, "{allowed} of {} allowed", results.len());
}
