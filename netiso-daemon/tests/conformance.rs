//! Every expectation of the upstream NetworkPolicy conformance cases in
//! tests/fixtures/conformance/netpol-cases.json must hold.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use netiso::policy::{
    ClusterState, ContainerPort, EndpointRef, Flow, NamespaceInfo, PodInfo, PolicyEngine, Protocol, Verdict,
};
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    id: String,
    name: String,
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    pods: Vec<CasePod>,
    policies: Vec<NetworkPolicy>,
    expect: Vec<Expectation>,
}

#[derive(Deserialize)]
struct CasePod {
    namespace: String,
    name: String,
    labels: BTreeMap<String, String>,
    ip: IpAddr,
    ports: Vec<CasePort>,
}

#[derive(Deserialize)]
struct CasePort {
    name: Option<String>,
    port: u16,
    protocol: Protocol,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum CaseEndpoint {
    Pod(String),
    Ip { ip: IpAddr },
}

#[derive(Deserialize)]
struct Expectation {
    from: CaseEndpoint,
    to: CaseEndpoint,
    port: u16,
    protocol: Protocol,
    allowed: bool,
}

fn endpoint(e: &CaseEndpoint) -> EndpointRef {
    match e {
        CaseEndpoint::Pod(key) => key.parse().expect("ns/pod"),
        CaseEndpoint::Ip { ip } => EndpointRef::Ip(*ip),
    }
}

fn fixture_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/conformance/netpol-cases.json")
}

/// The reference copy of the cases, where a checkout keeps one beside the project.
fn reference_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/conformance/netpol-cases.json")
}

#[test]
fn the_fixture_equals_the_reference_cases_where_they_exist() {
    let reference = reference_path();
    let expected = match std::fs::read(&reference) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!("no reference cases at {}: nothing to compare", reference.display());
            return;
        }
        Err(e) => panic!("{}: {e}", reference.display()),
    };
    let fixture = std::fs::read(fixture_path()).expect("the conformance fixture is readable");
    assert!(
        fixture == expected,
        "{} differs from {}: copy the reference over the fixture",
        fixture_path().display(),
        reference.display()
    );
}

#[test]
fn upstream_conformance_cases_all_hold() {
    let path = fixture_path();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let cases: Vec<Case> = serde_json::from_str(&text).expect("conformance file parses");
    let mut checked = 0;
    let mut failures = Vec::new();
    for case in &cases {
        let state = ClusterState {
            namespaces: case
                .namespaces
                .iter()
                .map(|(name, labels)| NamespaceInfo { name: name.clone(), labels: labels.clone() })
                .collect(),
            pods: case
                .pods
                .iter()
                .map(|p| PodInfo {
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                    labels: p.labels.clone(),
                    ips: vec![p.ip],
                    ports: p
                        .ports
                        .iter()
                        .map(|cp| ContainerPort { name: cp.name.clone(), port: cp.port, protocol: cp.protocol })
                        .collect(),
                    host_network: false,
                    node: None,
                })
                .collect(),
            policies: case.policies.clone(),
            nodes: vec![],
        };
        let engine = PolicyEngine::new(state);
        for e in &case.expect {
            let flow = Flow { from: endpoint(&e.from), to: endpoint(&e.to), port: e.port, protocol: e.protocol };
            let verdict = engine.verdict(&flow).unwrap_or_else(|err| panic!("{}: {err}", case.id));
            // The explanation must agree with the fast path.
            let explained = engine.explain(&flow).unwrap().verdict;
            assert_eq!(verdict, explained, "{} {}: explain disagrees with verdict for {flow:?}", case.id, case.name);
            checked += 1;
            if (verdict == Verdict::Allowed) != e.allowed {
                failures.push(format!(
                    "{} {}: {} -> {} {}/{}: expected {}, got {verdict:?}",
                    case.id,
                    case.name,
                    flow.from,
                    flow.to,
                    flow.protocol,
                    flow.port,
                    if e.allowed { "allowed" } else { "denied" }
                ));
            }
        }
    }
    println!("conformance: checked {checked} expectations in {} cases, {} failed", cases.len(), failures.len());
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
    assert!(checked > 3000, "expected the whole suite, checked only {checked}");
}
