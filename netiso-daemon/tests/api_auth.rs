//! The query API protects itself: bearer tokens checked with TokenReview, `get nodes/proxy`
//! checked with SubjectAccessReview (against a fake API server), cached decisions that expire,
//! failing closed when the API server is gone, TLS with a generated certificate, and a metrics
//! listener that needs no credentials.

mod support;

use std::process::Command;
use std::time::Duration;

use serde_json::json;
use support::apiserver::{FakeApiServer, namespace};
use support::{curl, node_and_pod, start_daemon, tag, wait_until, write_certificate};

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

/// The DaemonSet's container as shipped: its arguments and environment, with the downward API's
/// fields resolved for `node` at `ip` (and `$(VAR)` references expanded, as the kubelet does).
/// The store and log format are the test's; metrics listen on the node's address, so that two
/// daemons share one network namespace.
fn shipped_daemon(node: &str, ip: &str) -> (Vec<String>, Vec<(String, String)>) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/netiso/base/daemonset.yaml");
    let daemonset: k8s_openapi::api::apps::v1::DaemonSet =
        serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let container = daemonset.spec.unwrap().template.spec.unwrap().containers.remove(0);
    let env: Vec<(String, String)> = container
        .env
        .unwrap_or_default()
        .into_iter()
        .map(|var| {
            let field = var.value_from.and_then(|f| f.field_ref).map(|f| f.field_path);
            let value = match field.as_deref() {
                Some("spec.nodeName") => node.to_owned(),
                Some("status.hostIP") => ip.to_owned(),
                Some("metadata.namespace") => "netiso".to_owned(),
                other => var.value.unwrap_or_else(|| panic!("{}: unexpected source {other:?}", var.name)),
            };
            (var.name, value)
        })
        .collect();
    let expand = |arg: &str| env.iter().fold(arg.to_owned(), |a, (k, v)| a.replace(&format!("$({k})"), v));
    let args = container
        .args
        .unwrap_or_default()
        .iter()
        .filter(|a| !a.starts_with("--store=") && !a.starts_with("--log-format=") && *a != "run")
        .map(|a| if a.starts_with("--metrics-listen=") { format!("--metrics-listen={ip}:9962") } else { expand(a) })
        .collect();
    (args, env)
}

/// `netiso observe --kube` against the DaemonSet as shipped (`--api-auth kubernetes`, TLS with a
/// generated certificate): each daemon publishes its CA in the netiso-api-ca ConfigMap, and the
/// CLI asks each at its node's address with the caller's token, trusting only that CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_kube_asks_the_shipped_daemonset_with_the_callers_token() {
    let tag = tag("nk");
    let (node, pod_ns, mut cleanup) = node_and_pod(&tag);
    support::connect(&node, &pod_ns);
    let fake = FakeApiServer::start_in(Some(&node)).await;
    fake.add_token("responder-token", "alice", &["netiso-responders"]);
    fake.add_token("outsider-token", "mallory", &[]);
    fake.grant("alice", true);
    let daemons = [("node-a", "127.0.0.2"), ("node-b", "127.0.0.3")];
    for (name, ip) in daemons {
        fake.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "uid": name}, "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}));
        let pod = format!("netiso-{}", &name[5..]);
        fake.apply(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod, "namespace": "netiso", "uid": pod, "labels": {"app.kubernetes.io/name": "netiso"}}, "spec": {"nodeName": name, "hostNetwork": true, "containers": [{"name": "netiso", "image": "netiso"}]}, "status": {"phase": "Running", "hostIP": ip, "podIP": ip}}));
    }
    // Created with the DaemonSet (deploy/netiso/base), empty.
    fake.apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "netiso-api-ca", "namespace": "netiso", "uid": "cm"}}));

    // Removed when dropped, also when the test fails: it holds keys and kubeconfigs.
    let scratch = tempfile::Builder::new().prefix(&tag).tempdir().unwrap();
    let dir = scratch.path();
    let daemon_kubeconfig = dir.join("daemon-kubeconfig");
    fake.kubeconfig(&daemon_kubeconfig);
    let mut running = Vec::new();
    for (name, ip) in daemons {
        let store = dir.join(name).join("evidence.redb");
        cleanup.files.push(store.clone());
        let (mut args, env) = shipped_daemon(name, ip);
        assert!(args.contains(&"--api-auth=kubernetes".to_owned()), "{args:?}");
        args.extend(["--kubeconfig".to_owned(), daemon_kubeconfig.display().to_string()]);
        args.extend(["--drain-interval".to_owned(), "200ms".to_owned()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let daemon = support::Daemon::start_with(
            std::path::Path::new(env!("CARGO_BIN_EXE_netiso")),
            &node,
            &store,
            &args,
            None,
            &env,
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
        running.push(daemon);
    }
    let published = || fake.object("ConfigMap", "netiso/netiso-api-ca").unwrap()["data"].clone();
    assert!(
        wait_until(Duration::from_secs(20), || daemons.iter().all(|(name, _)| published()[name].is_string())),
        "every daemon publishes its CA under its node's name: {}",
        published()
    );
    support::udp_from_pod(&pod_ns, 43002, 9302);

    let observe = |token: Option<&str>| {
        let kubeconfig = dir.join(format!("kubeconfig-{}", token.unwrap_or("none")));
        fake.kubeconfig_with_token(&kubeconfig, token);
        let out = Command::new("ip")
            .args(["netns", "exec", &node, env!("CARGO_BIN_EXE_netiso"), "observe", "--kube"])
            .args(["--verdict", "dropped", "--port", "9302", "-o", "json"])
            .env("KUBECONFIG", &kubeconfig)
            .output()
            .unwrap();
        let nodes: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["node"].as_str().unwrap().to_owned())
            .collect();
        (out.status.success(), nodes, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let mut last = None;
    let both = wait_until(Duration::from_secs(20), || {
        let (ok, nodes, stderr) = observe(Some("responder-token"));
        let done = ok && nodes.iter().any(|n| n == "node-a") && nodes.iter().any(|n| n == "node-b");
        last = Some((nodes, stderr));
        done
    });
    assert!(both, "both daemons answered the responder: {last:?}");
    let requests = fake.requests.lock().unwrap().clone();
    assert!(!requests.iter().any(|r| r.contains("/proxy")), "asked directly, not through the pod proxy: {requests:?}");

    // A followed stream comes the same way, from every node.
    let kubeconfig = dir.join("kubeconfig-responder-token");
    let mut follow = std::process::Command::new("ip")
        .args(["netns", "exec", &node, env!("CARGO_BIN_EXE_netiso"), "observe", "--kube", "--follow"])
        .args(["--port", "9303", "-o", "json"])
        .env("KUBECONFIG", &kubeconfig)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    let stdout = follow.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let mut followed = std::collections::BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut sport = 43100;
    while followed.len() < 2 && std::time::Instant::now() < deadline {
        // Until both streams are open, a datagram may come before one of them: send again.
        support::udp_from_pod(&pod_ns, sport, 9303);
        sport += 1;
        while let Ok(line) = lines_rx.recv_timeout(Duration::from_millis(500)) {
            let flow: serde_json::Value = serde_json::from_str(&line).unwrap();
            followed.insert(flow["node"].as_str().unwrap().to_owned());
        }
    }
    let _ = follow.kill();
    let _ = follow.wait();
    assert_eq!(followed.len(), 2, "followed from both nodes: {followed:?}");

    // Authorization is the daemons' (TokenReview + SubjectAccessReview), per caller.
    let (ok, nodes, stderr) = observe(Some("outsider-token"));
    assert!(!ok && nodes.is_empty(), "{nodes:?}");
    assert!(stderr.contains("user mallory may not get nodes/proxy node-a"), "{stderr}");
    let (ok, _, stderr) = observe(None);
    assert!(!ok && stderr.contains("--token"), "a user without a bearer token is told how to give one: {stderr}");

    // Trust is each node's own CA: a daemon whose certificate its published CA did not sign is
    // refused (the token never reaches it), and the others still answer, in a listing that says
    // it is partial.
    let mut swapped = fake.object("ConfigMap", "netiso/netiso-api-ca").unwrap();
    swapped["data"]["node-b"] = swapped["data"]["node-a"].clone();
    fake.apply(swapped);
    let (ok, nodes, stderr) = observe(Some("responder-token"));
    assert!(!ok && nodes.iter().all(|n| n == "node-a") && !nodes.is_empty(), "{nodes:?} {stderr}");
    assert!(stderr.contains("cannot reach netiso/netiso-b at https://127.0.0.3:9963"), "{stderr}");
    assert!(stderr.contains("the listing is partial"), "{stderr}");

    // A netiso pod whose node has published no CA yet (its daemon is starting) is not asked
    // through a path that would drop the token or trust nothing: it is named, with the way out.
    fake.apply(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "netiso-c", "namespace": "netiso", "uid": "netiso-c", "labels": {"app.kubernetes.io/name": "netiso"}}, "spec": {"nodeName": "node-c", "hostNetwork": true, "containers": [{"name": "netiso", "image": "netiso"}]}, "status": {"phase": "Running", "hostIP": "127.0.0.4", "podIP": "127.0.0.4"}}));
    let (ok, nodes, stderr) = observe(Some("responder-token"));
    assert!(!ok && nodes.iter().any(|n| n == "node-a"), "{nodes:?} {stderr}");
    assert!(stderr.contains("netiso/netiso-c node `node-c` has published no CA"), "{stderr}");
    assert!(stderr.contains("--ca-file"), "{stderr}");

    for mut daemon in running {
        daemon.stop().unwrap();
        let logs = daemon.diagnostics().join("\n");
        assert!(!logs.contains("responder-token") && !logs.contains("outsider-token"), "the daemon logged a token");
    }
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
