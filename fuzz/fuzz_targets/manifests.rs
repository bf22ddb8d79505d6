//! Manifest files (`--manifests`, `whatif --policies`): parsed, compiled into the policy engine,
//! and asked about flows between the pods they define.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use netiso::inventory::manifests::{Manifests, parse_into};
use netiso::policy::engine::PolicyEngine;
use netiso::policy::model::{EndpointRef, Flow, Protocol};

fuzz_target!(|text: &str| {
    let mut manifests = Manifests::default();
    if parse_into(Path::new("fuzz.yaml"), text, &mut manifests).is_err() {
        return;
    }
    let pods: Vec<EndpointRef> = manifests
        .state
        .pods
        .iter()
        .take(3)
        .map(|p| EndpointRef::Pod { namespace: p.namespace.clone(), name: p.name.clone(), ip: None })
        .chain([EndpointRef::Ip("192.0.2.1".parse().expect("an address"))])
        .collect();
    let engine = PolicyEngine::new(manifests.state);
    for from in &pods {
        for to in &pods {
            for protocol in [Protocol::Tcp, Protocol::Udp] {
                let flow = Flow { from: from.clone(), to: to.clone(), port: 80, protocol };
                let _ = engine.verdict(&flow);
                let _ = engine.explain(&flow);
            }
        }
    }
});
