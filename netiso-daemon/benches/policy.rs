//! Verdicts per second on a synthetic cluster of 10,000 pods in 200 namespaces with 1,000
//! policies: uncached (resolve both addresses, evaluate both directions) and through the verdict
//! cache. Run with `cargo bench -p netiso-daemon --bench policy`.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::IpAddr;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use netiso::policy::{ClusterState, ContainerPort, EndpointRef, NamespaceInfo, PodInfo, PolicyEngine, Protocol};

const NAMESPACES: usize = 200;
const PODS_PER_NAMESPACE: usize = 50;
const FLOWS: usize = 100_000;

fn labels(pairs: &[(&str, String)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

fn policy(yaml: String) -> k8s_openapi::api::networking::v1::NetworkPolicy {
    serde_saphyr::from_str(&yaml).expect("synthetic policy parses")
}

fn ip(ns: usize, pod: usize) -> IpAddr {
    IpAddr::from([10, ns as u8, 0, pod as u8 + 1])
}

fn cluster() -> ClusterState {
    let envs = ["dev", "staging", "prod"];
    let tiers = ["web", "api", "db"];
    let mut state = ClusterState::default();
    for n in 0..NAMESPACES {
        let name = format!("ns-{n}");
        state.namespaces.push(NamespaceInfo {
            name: name.clone(),
            labels: labels(&[("team", format!("team-{}", n % 20)), ("env", envs[n % 3].into())]),
        });
        for p in 0..PODS_PER_NAMESPACE {
            state.pods.push(PodInfo {
                namespace: name.clone(),
                name: format!("pod-{p}"),
                labels: labels(&[
                    ("app", format!("app-{}", p % 10)),
                    ("tier", tiers[p % 3].into()),
                    ("pod-template-hash", format!("h{p}")),
                ]),
                ips: vec![ip(n, p)],
                ports: vec![
                    ContainerPort { name: Some("http".into()), port: 8080, protocol: Protocol::Tcp },
                    ContainerPort { name: Some("metrics".into()), port: 9090, protocol: Protocol::Tcp },
                ],
                host_network: false,
                node: None,
            });
        }
        let team = n % 20;
        state.policies.extend([
            policy(format!("metadata: {{name: default-deny, namespace: {name}}}\nspec: {{podSelector: {{}}, policyTypes: [Ingress, Egress]}}")),
            policy(format!(
                "metadata: {{name: allow-dns, namespace: {name}}}\nspec:\n  podSelector: {{}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{{namespaceSelector: {{matchLabels: {{team: team-0}}}}, podSelector: {{matchLabels: {{app: app-0}}}}}}]\n    ports: [{{port: 53, protocol: UDP}}, {{port: 53, protocol: TCP}}]"
            )),
            policy(format!(
                "metadata: {{name: allow-team, namespace: {name}}}\nspec:\n  podSelector: {{matchLabels: {{tier: api}}}}\n  ingress:\n  - from: [{{namespaceSelector: {{matchLabels: {{team: team-{team}}}}}}}, {{namespaceSelector: {{matchLabels: {{env: prod}}}}}}]\n    ports: [{{port: http}}]"
            )),
            policy(format!(
                "metadata: {{name: allow-web-to-api, namespace: {name}}}\nspec:\n  podSelector: {{matchExpressions: [{{key: tier, operator: In, values: [api, db]}}]}}\n  ingress:\n  - from: [{{podSelector: {{matchLabels: {{tier: web}}}}}}]\n    ports: [{{port: 8080, endPort: 8090}}]"
            )),
            policy(format!(
                "metadata: {{name: allow-egress, namespace: {name}}}\nspec:\n  podSelector: {{}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{{ipBlock: {{cidr: 10.0.0.0/8, except: [10.{n}.0.0/16]}}}}, {{namespaceSelector: {{matchExpressions: [{{key: env, operator: In, values: [prod, staging]}}]}}}}]\n    ports: [{{port: 8080}}, {{port: metrics}}]"
            )),
        ]);
    }
    state
}

/// Deterministic pseudo-random flows between pods (a linear congruential generator).
fn flows() -> Vec<(IpAddr, IpAddr, u16)> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move |m: usize| {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((x >> 33) as usize) % m
    };
    let ports = [8080, 9090, 53, 443, 8085];
    (0..FLOWS)
        .map(|_| {
            // Half the flows stay inside their namespace, as most real traffic does.
            let (sn, sp, dp) = (next(NAMESPACES), next(PODS_PER_NAMESPACE), next(PODS_PER_NAMESPACE));
            let dn = if next(2) == 0 { sn } else { next(NAMESPACES) };
            (ip(sn, sp), ip(dn, dp), ports[next(ports.len())])
        })
        .collect()
}

fn verdicts(c: &mut Criterion) {
    let engine = PolicyEngine::new(cluster());
    assert!(engine.errors().is_empty(), "{:?}", engine.errors());
    assert_eq!(engine.policies().len(), NAMESPACES * 5);
    assert_eq!(engine.pods().len(), NAMESPACES * PODS_PER_NAMESPACE);
    let flows = flows();
    let decide = |(src, dst, port): &(IpAddr, IpAddr, u16)| {
        let from = engine.resolve(&EndpointRef::Ip(*src)).expect("pod address");
        let to = engine.resolve(&EndpointRef::Ip(*dst)).expect("pod address");
        engine.allows(from, to, *port, Protocol::Tcp)
    };
    let allowed = flows.iter().filter(|f| decide(f)).count();
    println!("synthetic cluster: {} of {FLOWS} flows allowed", allowed);
    assert!(allowed > FLOWS / 50 && allowed < FLOWS - FLOWS / 50, "the mix must exercise both verdicts");

    let mut group = c.benchmark_group("verdicts");
    group.throughput(Throughput::Elements(FLOWS as u64));
    group.sample_size(10);
    group.bench_function("decide", |b| b.iter(|| flows.iter().filter(|f| decide(black_box(f))).count()));
    group.finish();

    c.bench_function("engine build (10,000 pods, 1,000 policies)", |b| {
        b.iter_batched(cluster, PolicyEngine::new, criterion::BatchSize::LargeInput)
    });
}

criterion_group!(benches, verdicts);
criterion_main!(benches);
