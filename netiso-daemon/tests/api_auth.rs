//! The query API protects itself: bearer tokens checked with TokenReview, `get nodes/proxy`
//! checked with SubjectAccessReview (against a fake API server), cached decisions that expire,
//! failing closed when the API server is gone, TLS with a generated certificate, and a metrics
//! listener that needs no credentials.

mod support;

use std::process::Command;
use std::time::Duration;

use serde_json::json;
use support::apiserver::{FakeApiServer, namespace};
use support::{curl, node_and_pod, start_daemon, tag, write_certificate};

fn api(node: &str, token: Option<&str>) -> (u16, String) {
    let header = token.map(|t| format!("Authorization: Bearer {t}"));
    let mut args = vec!["https://127.0.0.1:9963/v1/flows"];
    if let Some(h) = &header {
        args.extend(["-H", h.as_str()]);
    }
    curl(node, &args)
}

fn netiso_cli(node: &str, args: &[&str]) -> std::process::Output {
    Command::new("ip").args(["netns", "exec", node, env!("CARGO_BIN_EXE_netiso")]).args(args).output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_requires_a_granted_token_and_fails_closed() {
    let tag = tag("na");
    let (node, _pod, mut cleanup) = node_and_pod(&tag);
    let mut fake = FakeApiServer::start_in(Some(&node)).await;
    fake.apply(namespace("default", json!({"kubernetes.io/metadata.name": "default"})));
    fake.add_token("good-token-1", "alice", &["responders"]);
    fake.add_token("good-token-2", "bob", &[]);
    fake.add_token("good-token-3", "carol", &[]);
    fake.grant("alice", true);
    fake.grant("carol", true);

    // Removed when dropped, also when the test fails: it holds keys and kubeconfigs.
    let scratch = tempfile::Builder::new().prefix(&tag).tempdir().unwrap();
    let dir = scratch.path();
    let kubeconfig = dir.join("kubeconfig");
    fake.kubeconfig(&kubeconfig);
    let store = dir.join("evidence.redb");
    let args = [
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--node-name",
        "n1",
        "--api-auth",
        "kubernetes",
        "--auth-cache-ttl",
        "2s",
    ];
    let mut daemon = start_daemon(&node, &store, &args);
    cleanup.files.push(store.clone());
    assert!(daemon.wait_log("generated a certificate for the API", Duration::from_secs(5)));

    // Metrics need no credentials; the API refuses anonymous and invalid callers, with no data.
    assert_eq!(curl(&node, &["http://127.0.0.1:9962/metrics"]).0, 200);
    let (status, body) = api(&node, None);
    assert_eq!(status, 401);
    assert!(!body.contains("flows"), "{body}");
    assert_eq!(api(&node, Some("not-a-token")).0, 401);
    let (status, body) = api(&node, Some("good-token-2"));
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("user bob may not get nodes/proxy n1") && !body.contains("\"flows\""), "{body}");
    let (status, body) = api(&node, Some("good-token-1"));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"flows\""));

    // Decisions are cached, and expire: a revoked grant stops working within the TTL.
    let reviews = fake.reviews();
    assert_eq!(api(&node, Some("good-token-1")).0, 200);
    assert_eq!(fake.reviews(), reviews, "answered from the cache");
    fake.grant("alice", false);
    assert_eq!(api(&node, Some("good-token-1")).0, 200, "still cached");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(api(&node, Some("good-token-1")).0, 403, "the revocation took effect after the TTL");

    // TLS: the CLI trusts the generated CA when given it, and refuses without it.
    let ca = dir.join("api-ca.pem");
    assert!(ca.exists(), "the generated CA is written beside the store");
    let server = ["--server", "https://127.0.0.1:9963", "--token", "good-token-3"];
    let with_ca =
        netiso_cli(&node, &[&["observe", "-o", "json", "--ca-file", ca.to_str().unwrap()][..], &server[..]].concat());
    assert!(with_ca.status.success(), "{}", String::from_utf8_lossy(&with_ca.stderr));
    let without = netiso_cli(&node, &[&["observe", "-o", "json"][..], &server[..]].concat());
    assert!(!without.status.success(), "an unknown certificate is refused");
    let insecure =
        netiso_cli(&node, &[&["observe", "-o", "json", "--insecure-skip-tls-verify"][..], &server[..]].concat());
    assert!(insecure.status.success());
    assert!(String::from_utf8_lossy(&insecure.stderr).contains("warning: --insecure-skip-tls-verify"));

    // The API server goes away: uncached tokens fail closed with 503; the daemon stays up and
    // metrics keep working.
    fake.go_away();
    fake.add_token("good-token-4", "dave", &[]);
    let (status, body) = api(&node, Some("good-token-4"));
    assert_eq!(status, 503, "{body}");
    assert!(daemon.is_running());
    assert_eq!(curl(&node, &["http://127.0.0.1:9962/metrics"]).0, 200);

    daemon.stop().unwrap();
    let logs = daemon.diagnostics().join("\n");
    for token in ["good-token-1", "good-token-2", "good-token-3", "good-token-4", "not-a-token"] {
        assert!(!logs.contains(token), "the daemon logged a token");
    }
}

/// `netiso observe --kube`: the CLI finds the netiso pods and reads each through the API
/// server's pod proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_through_the_api_servers_pod_proxy() {
    let tag = tag("nq");
    let (node, pod_ns, mut cleanup) = node_and_pod(&tag);
    let fake = FakeApiServer::start_in(Some(&node)).await;
    let netiso_pod = |name: &str| json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "netiso", "uid": name, "labels": {"app.kubernetes.io/name": "netiso"}}, "status": {"podIP": "10.99.0.1"}});
    fake.apply(netiso_pod("netiso-a"));
    fake.apply(netiso_pod("netiso-b"));
    // Removed when dropped, also when the test fails: it holds keys and kubeconfigs.
    let scratch = tempfile::Builder::new().prefix(&tag).tempdir().unwrap();
    let dir = scratch.path();
    let kubeconfig = dir.join("kubeconfig");
    fake.kubeconfig(&kubeconfig);
    support::connect(&node, &pod_ns);
    let (store_a, store_b) = (dir.join("a.redb"), dir.join("b.redb"));
    cleanup.files.extend([store_a.clone(), store_b.clone()]);
    let mut a = start_daemon(
        &node,
        &store_a,
        &[
            "--node-name",
            "node-a",
            "--listen",
            "127.0.0.1:9971",
            "--metrics-listen",
            "127.0.0.1:9981",
            "--drain-interval",
            "200ms",
        ],
    );
    let mut b = start_daemon(
        &node,
        &store_b,
        &[
            "--node-name",
            "node-b",
            "--listen",
            "127.0.0.1:9972",
            "--metrics-listen",
            "127.0.0.1:9982",
            "--drain-interval",
            "200ms",
        ],
    );
    fake.proxy("netiso/netiso-a:9963", "127.0.0.1:9971".parse().unwrap());
    fake.proxy("netiso/netiso-b:9963", "127.0.0.1:9972".parse().unwrap());
    support::udp_from_pod(&pod_ns, 43001, 9301);
    tokio::time::sleep(Duration::from_millis(1200)).await;

    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &node,
            env!("CARGO_BIN_EXE_netiso"),
            "observe",
            "--kube",
            "--verdict",
            "dropped",
            "--port",
            "9301",
            "-o",
            "json",
        ])
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let flows: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let nodes: Vec<&str> = flows.iter().filter_map(|f| f["node"].as_str()).collect();
    assert!(
        nodes.contains(&"node-a") && nodes.contains(&"node-b"),
        "both daemons answered through the proxy: {flows:#?}"
    );
    a.stop().unwrap();
    b.stop().unwrap();
}

/// A certificate from files is used, and replaced without a restart when the files change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_certificate_is_reloaded_when_its_files_change() {
    let tag = tag("nt");
    let (node, _pod, mut cleanup) = node_and_pod(&tag);
    // Removed when dropped, also when the test fails: it holds keys and kubeconfigs.
    let scratch = tempfile::Builder::new().prefix(&tag).tempdir().unwrap();
    let dir = scratch.path();
    let (first_ca, cert, key) = write_certificate(dir, "one");
    let store = dir.join("evidence.redb");
    cleanup.files.push(store.clone());
    let mut daemon =
        start_daemon(&node, &store, &["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()]);
    let observe = |ca: &std::path::Path| {
        netiso_cli(
            &node,
            &["observe", "--server", "https://127.0.0.1:9963", "--ca-file", ca.to_str().unwrap(), "-o", "json"],
        )
        .status
        .success()
    };
    assert!(observe(&first_ca));
    let (second_ca, _, _) = write_certificate(dir, "two");
    assert!(!observe(&second_ca), "not yet: the first certificate is served");
    assert!(daemon.wait_log("API TLS certificate reloaded", Duration::from_secs(15)));
    assert!(observe(&second_ca), "the new certificate is served");
    assert!(!observe(&first_ca));
    daemon.stop().unwrap();
}
