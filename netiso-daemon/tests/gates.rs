//! `netiso whatif` and `netiso advise` are gates: any failure to read the recorded traffic, a
//! partial answer or an invalid proposed policy ends in a non-zero exit with the reason, never in
//! a pass.

mod support;

use std::process::{Command, Output};

use support::{node_and_pod, start_daemon, tag};

/// netiso's CLI inside the node namespace, where the daemon's API listens on 127.0.0.1:9963.
fn cli(node: &str, args: &[&str]) -> Output {
    Command::new("ip").args(["netns", "exec", node, env!("CARGO_BIN_EXE_netiso")]).args(args).output().unwrap()
}

fn failed_saying(out: &Output, words: &[&str]) -> bool {
    let stderr = String::from_utf8_lossy(&out.stderr);
    !out.status.success() && words.iter().all(|w| stderr.contains(w))
}

const DEFAULT_DENY: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny-all, namespace: production}
spec: {podSelector: {}, policyTypes: [Ingress, Egress]}
";

const INVALID_OPERATOR: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-some, namespace: production}
spec:
  podSelector:
    matchExpressions: [{key: app, operator: Exists-ish}]
  policyTypes: [Ingress]
  ingress: [{}]
";

#[test]
fn whatif_and_advise_fail_closed() {
    let tag = tag("ng");
    let (node, _pod, mut cleanup) = node_and_pod(&tag);
    let dir = std::env::temp_dir();
    let (store, deny, invalid) =
        (dir.join(format!("{tag}.redb")), dir.join(format!("{tag}-deny.yaml")), dir.join(format!("{tag}-bad.yaml")));
    cleanup.files.extend([store.clone(), deny.clone(), invalid.clone()]);
    std::fs::write(&deny, DEFAULT_DENY).unwrap();
    std::fs::write(&invalid, INVALID_OPERATOR).unwrap();
    let manifests = format!("{}/tests/fixtures/course.yaml", env!("CARGO_MANIFEST_DIR"));
    let mut daemon = start_daemon(&node, &store, &["--manifests", &manifests]);
    let deny = deny.to_str().unwrap();
    let gate = |extra: &[&str]| {
        let mut args = vec!["whatif", "--policies", deny, "--fail-on-deny", "--since", "1h"];
        args.extend_from_slice(extra);
        cli(&node, &args)
    };

    let passes = gate(&[]);
    assert!(passes.status.success(), "a readable window with nothing to deny passes: {passes:?}");

    let partial = gate(&["--server", "http://127.0.0.1:9963", "--server", "http://127.0.0.1:9"]);
    assert!(failed_saying(&partial, &["http://127.0.0.1:9"]), "one unreachable server fails the gate: {partial:?}");

    let refused = cli(&node, &["whatif", "--policies", deny, "--fail-on-deny", "--since", "300000000000y"]);
    assert!(failed_saying(&refused, &["HTTP 400", "since"]), "a refused window fails the gate: {refused:?}");

    let bad_policy =
        cli(&node, &["whatif", "--policies", invalid.to_str().unwrap(), "--fail-on-deny", "--since", "1h"]);
    assert!(
        failed_saying(&bad_policy, &["Exists-ish", "cannot be evaluated"]),
        "an invalid proposed policy fails the gate: {bad_policy:?}"
    );

    let advise = |extra: &[&str]| {
        let mut args = vec!["advise", "--namespace", "production", "--since", "1h"];
        args.extend_from_slice(extra);
        cli(&node, &args)
    };
    let unreachable = advise(&["--server", "http://127.0.0.1:9963", "--server", "http://127.0.0.1:9"]);
    assert!(failed_saying(&unreachable, &["http://127.0.0.1:9"]), "{unreachable:?}");
    let nothing = advise(&[]);
    assert!(
        failed_saying(&nothing, &["no recorded forwarded flows of production"]),
        "no advice from no traffic: {nothing:?}"
    );
    assert!(nothing.stdout.is_empty(), "no allow set printed: {}", String::from_utf8_lossy(&nothing.stdout));
    daemon.stop().unwrap();
}

/// A record of develop/debug's forwarded call to production/api from source port `port`, in the
/// store's own form.
fn recorded_call(id: u64, port: u16) -> netiso::evidence::record::FlowRecord {
    let time = humantime::format_rfc3339_nanos(std::time::UNIX_EPOCH + std::time::Duration::from_nanos(id)).to_string();
    serde_json::from_value(serde_json::json!({
        "schema": 2, "id": id.to_string(), "time": time, "last_seen": time, "node": "n1",
        "verdict": "forwarded", "protocol": "TCP",
        "source": {"kind": "pod", "namespace": "develop", "pod": "debug", "workload": null,
            "ip": "10.244.0.10", "port": port},
        "destination": {"kind": "pod", "namespace": "production", "pod": "api", "workload": null,
            "ip": "10.244.0.30", "port": 8080},
        "reason": null, "packets": 1, "bytes": 60,
        "policy": {"verdict": "allowed", "direction": null, "attribution": "not_isolated", "policies": [], "summary": ""}
    }))
    .unwrap()
}

#[test]
fn whatif_replays_every_record_of_a_window_larger_than_a_page() {
    use netiso::evidence::store::{Retention, Store, StoreOp};
    const RECORDS: u64 = 12_000;
    let tag = tag("wp");
    let (node, _pod, mut cleanup) = node_and_pod(&tag);
    let dir = std::env::temp_dir();
    let (store, deny) = (dir.join(format!("{tag}.redb")), dir.join(format!("{tag}-deny.yaml")));
    cleanup.files.extend([store.clone(), deny.clone()]);
    std::fs::write(&deny, DEFAULT_DENY).unwrap();
    let newest =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 - 60_000_000_000;
    let ops: Vec<StoreOp> = (0..RECORDS)
        .map(|i| StoreOp::Insert(Box::new(recorded_call(newest - i * 1_000_000, 20_000 + i as u16))))
        .collect();
    Store::open(&store, Retention::default()).unwrap().write(&ops).unwrap();
    let manifests = format!("{}/tests/fixtures/course.yaml", env!("CARGO_MANIFEST_DIR"));
    let mut daemon = start_daemon(&node, &store, &["--manifests", &manifests]);

    let out = cli(&node, &["whatif", "--policies", deny.to_str().unwrap(), "--since", "1h", "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["evaluated"], RECORDS, "every record of the window, across pages");
    daemon.stop().unwrap();
}
